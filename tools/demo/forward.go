package main

import (
	"context"
	"io"
	"log"
	"net"
	"sync"
)

// forward accepts connections on ln (root namespace loopback) and joins
// each to a connection from dial, whose socket is created inside the lab's
// control namespace: grpcurl on this machine reaches the inspection API
// while the root namespace never sends a packet to a lab address.
func forward(ctx context.Context, ln net.Listener, dial func(context.Context) (net.Conn, error)) {
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return // closed at shutdown
		}
		wg.Go(func() {
			defer c.Close()
			upstream, err := dial(ctx)
			if err != nil {
				log.Printf("demo: inspection forward: %v", err)
				return
			}
			defer upstream.Close()
			// Either side ending ends both: closing unblocks the other copy.
			done := make(chan struct{}, 2)
			go func() { io.Copy(upstream, c); done <- struct{}{} }()
			go func() { io.Copy(c, upstream); done <- struct{}{} }()
			select {
			case <-done:
			case <-ctx.Done():
			}
		})
	}
}
