package main

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestFlagsFallBackToEnvironment(t *testing.T) {
	o, err := parseFlags([]string{"--mode", "ipvs"}, env(map[string]string{
		"SIGNALBOX_CONTROL_PLANE":       "198.18.0.2:9000",
		"NODE_NAME":                     "node-7",
		"SIGNALBOX_MODE":                "nftables", // the command line wins
		"SIGNALBOX_INSECURE":            "true",
		"SIGNALBOX_RESYNC_PERIOD":       "15s",
		"SIGNALBOX_NODE_PORT_ADDRESSES": "198.18.0.0/15, 2001:2::/48",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if o.controlPlane != "198.18.0.2:9000" || o.nodeName != "node-7" || o.mode != "ipvs" ||
		!o.insecure || o.resyncPeriod != 15*time.Second ||
		!slices.Equal(o.nodePortAddresses, []string{"198.18.0.0/15", "2001:2::/48"}) {
		t.Errorf("options = %+v", o)
	}
	if o.tokenFile != "/var/run/secrets/tokens/signalbox-token" || o.healthAddr != "0.0.0.0:10256" || o.metricsAddr != "127.0.0.1:10249" {
		t.Errorf("defaults = %+v", o)
	}
}

func TestSignalboxNodeNameBeatsDownwardAPI(t *testing.T) {
	o, err := parseFlags([]string{"--control-plane", "x:1"}, env(map[string]string{"SIGNALBOX_NODE_NAME": "a", "NODE_NAME": "b"}))
	if err != nil || o.nodeName != "a" {
		t.Errorf("node name %q, err %v", o.nodeName, err)
	}
}

func TestFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{nil, nil, "--control-plane is required"},
		{[]string{"--control-plane", "x:1"}, nil, "--node-name is required"},
		{[]string{"--control-plane", "x:1", "--node-name", "n"}, map[string]string{"SIGNALBOX_RESYNC_PERIOD": "soon"}, "$SIGNALBOX_RESYNC_PERIOD"},
		{[]string{"--bogus"}, nil, "bogus"},
	} {
		_, err := parseFlags(tc.args, env(tc.env))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v %v: err %v, want it to mention %q", tc.args, tc.env, err, tc.want)
		}
	}
	if _, err := parseFlags([]string{"--cleanup"}, env(nil)); err != nil {
		t.Errorf("--cleanup needs no control plane: %v", err)
	}
}

func TestModesAreExplicit(t *testing.T) {
	_, err := newPlane(context.Background(), "userspace", planeOptions{})
	if err == nil || !strings.Contains(err.Error(), "unknown mode") {
		t.Errorf("unknown mode: %v", err)
	}
	if code := run([]string{"--control-plane", "x:1", "--node-name", "n", "--mode", "userspace", "--log-format", "text"}, env(nil)); code == 0 {
		t.Error("run succeeded with an unknown mode")
	}
	if code := run([]string{"-h"}, env(nil)); code != 0 {
		t.Errorf("-h exits %d", code)
	}
}
