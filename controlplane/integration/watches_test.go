package integration

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/signalbox/signalbox/tools/devcluster/devclustertest"
	"github.com/signalbox/signalbox/tools/testagent"
)

// watches reads the apiserver's own count of open WATCH requests for the
// resources the control plane watches.
func watches(t *testing.T) int {
	t.Helper()
	raw, err := devclustertest.Get(t).Client().CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(context.Background())
	if err != nil {
		t.Fatalf("read apiserver metrics: %v", err)
	}
	total := 0
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "apiserver_longrunning_requests{") || !strings.Contains(line, `verb="WATCH"`) {
			continue
		}
		if !strings.Contains(line, `resource="services"`) && !strings.Contains(line, `resource="endpointslices"`) && !strings.Contains(line, `resource="nodes"`) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("parse %q: %v", line, err)
		}
		total += int(v)
	}
	return total
}

// settle waits until the watch count stops moving (watches of stopped
// planes from earlier tests take a moment to close).
func settle(t *testing.T) int {
	t.Helper()
	prev := -1
	for i := 0; i < 50; i++ {
		w := watches(t)
		if w == prev {
			return w
		}
		prev = w
		time.Sleep(100 * time.Millisecond)
	}
	return prev
}

func TestWatchesIndependentOfAgentCount(t *testing.T) {
	cs := devclustertest.Get(t).Client()
	base := settle(t)
	p := startPlane(t, cs)
	one := connect(t, p, "wc-0", nil)
	if _, err := one.NextAck(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	withOne := settle(t)
	if withOne-base < 1 || withOne-base > 3 {
		t.Fatalf("one control plane opened %d watches (base %d, now %d), want 1..3", withOne-base, base, withOne)
	}
	agents := []*testagent.Agent{one}
	for i := 1; i < 50; i++ {
		a := connect(t, p, fmt.Sprintf("wc-%d", i), nil)
		if _, err := a.NextAck(ctxT(t, 10*time.Second)); err != nil {
			t.Fatal(err)
		}
		agents = append(agents, a)
	}
	if withFifty := settle(t); withFifty != withOne {
		t.Fatalf("apiserver watches: %d with 1 agent, %d with %d agents; want equal", withOne, withFifty, len(agents))
	}
}
