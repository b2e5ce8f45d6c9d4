package iptables

import (
	"errors"
	"slices"
	"testing"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

func TestBlameNamesTheResourceOfARefusedChain(t *testing.T) {
	web := "svc/v4/ns/web/http"
	tb := pb.Table{web: nil, "svc/v4/ns/db/tcp": nil}
	err := blame(errors.New("line 4: CHAIN_DEL failed (Device or resource busy): chain SBX-SVC-"+shortHash(web)), tb)
	var re *ResourceError
	if !errors.As(err, &re) || !slices.Equal(re.Resources(), []string{web}) {
		t.Fatalf("blame = %v, want a ResourceError naming %s", err, web)
	}
	if err := blame(errors.New("iptables-restore: lock held"), tb); errors.As(err, &re) {
		t.Fatalf("an error naming no chain must stay as it is, got %v", err)
	}
}
