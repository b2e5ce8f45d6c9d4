package dataplane

import (
	"context"
	"fmt"
	"maps"
	"sync"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Fake is an in-memory Plane for unit tests of the agent core. It applies
// atomically and can be told to reject the next transactions.
type Fake struct {
	mu       sync.Mutex
	table    pb.Table
	applies  int
	syncs    int
	cleanups int
	failNext error
}

// NewFake returns an empty Fake.
func NewFake() *Fake { return &Fake{table: pb.Table{}} }

// Name implements Plane.
func (f *Fake) Name() string { return "fake" }

// FailNext makes the next Apply or Sync fail with err (nil clears it).
func (f *Fake) FailNext(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failNext = err
}

// Apply implements Plane.
func (f *Fake) Apply(_ context.Context, prev, next pb.Table) (Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.takeFailure(); err != nil {
		return Result{}, err
	}
	if !sameNames(prev, f.table) {
		return Result{}, fmt.Errorf("fake: prev does not match the applied table")
	}
	f.applies++
	f.table = maps.Clone(next)
	return Result{Rules: len(next)}, nil
}

// Sync implements Plane.
func (f *Fake) Sync(_ context.Context, t pb.Table) (Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.takeFailure(); err != nil {
		return Result{}, err
	}
	f.syncs++
	f.table = maps.Clone(t)
	return Result{Rules: len(t)}, nil
}

// Cleanup implements Plane.
func (f *Fake) Cleanup(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups++
	f.table = pb.Table{}
	return nil
}

// Table returns a copy of what the fake kernel holds.
func (f *Fake) Table() pb.Table {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.table)
}

// Counts returns how many Apply, Sync and Cleanup calls succeeded.
func (f *Fake) Counts() (applies, syncs, cleanups int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.applies, f.syncs, f.cleanups
}

func (f *Fake) takeFailure() error {
	err := f.failNext
	f.failNext = nil
	return err
}

func sameNames(a, b pb.Table) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w.GetHash() != v.GetHash() {
			return false
		}
	}
	return true
}
