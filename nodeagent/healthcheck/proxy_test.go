package healthcheck

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/signalbox/signalbox/nodeagent/metrics"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func TestTrackerStaleness(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	tr := NewTracker(time.Minute, clock.now)
	steps := []struct {
		do      func()
		advance time.Duration
		healthy bool
	}{
		{nil, 0, true},                // starting up: nothing pending
		{tr.QueuedUpdate, 0, true},    // pending, not late
		{nil, 59 * time.Second, true}, // still within the window
		{tr.QueuedUpdate, 0, true},    // a later change must not move the deadline
		{nil, time.Second, false},     // the oldest change is a minute old
		{tr.Updated, 0, true},         // applied
		{nil, 10 * time.Minute, true}, // idle is not stale
		{tr.QueuedUpdate, 0, true},    //
		{nil, 2 * time.Minute, false}, //
	}
	for i, s := range steps {
		if s.do != nil {
			s.do()
		}
		clock.t = clock.t.Add(s.advance)
		if got := tr.Health().Healthy; got != s.healthy {
			t.Errorf("step %d: healthy = %v, want %v", i, got, s.healthy)
		}
	}
}

func TestHealthzAndLivez(t *testing.T) {
	clock := &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	tr := NewTracker(time.Minute, clock.now)
	m := metrics.New()
	h := HealthHandler(tr, m)

	tr.Updated()
	applied := clock.t
	clock.t = clock.t.Add(30 * time.Second)
	for _, path := range []string{"/healthz", "/livez"} {
		code, body, hdr := get(t, h, path)
		if code != http.StatusOK || hdr.Get("Content-Type") != "application/json" || hdr.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s healthy: %d %v", path, code, hdr)
		}
		var got Health
		if err := json.Unmarshal([]byte(body), &got); err != nil {
			t.Fatalf("%s body %q: %v", path, body, err)
		}
		// While healthy, lastUpdated reads "now", as kube-proxy's does.
		if !got.Healthy || !got.LastUpdated.Equal(clock.t) || !got.CurrentTime.Equal(clock.t) {
			t.Errorf("%s healthy body = %s", path, body)
		}
	}

	tr.QueuedUpdate()
	clock.t = clock.t.Add(2 * time.Minute)
	for _, path := range []string{"/healthz", "/livez"} {
		code, body, _ := get(t, h, path)
		var got Health
		_ = json.Unmarshal([]byte(body), &got)
		if code != http.StatusServiceUnavailable || got.Healthy || !got.LastUpdated.Equal(applied) {
			t.Errorf("%s stale: %d %s", path, code, body)
		}
		for _, key := range []string{`"lastUpdated"`, `"currentTime"`, `"healthy"`} {
			if !strings.Contains(body, key) {
				t.Errorf("%s body lacks %s: %s", path, key, body)
			}
		}
	}
	if got := value(t, m.HealthzTotal.WithLabelValues("200")); got != 1 {
		t.Errorf("healthz 200 count = %v", got)
	}
	if got := value(t, m.LivezTotal.WithLabelValues("503")); got != 1 {
		t.Errorf("livez 503 count = %v", got)
	}
}

func TestMetricsHandlerServesRegistryAndMode(t *testing.T) {
	m := metrics.New()
	m.DeltasApplied.Add(3)
	h := MetricsHandler(NewTracker(time.Minute, nil), m, "iptables")
	code, body, _ := get(t, h, "/metrics")
	if code != http.StatusOK || !strings.Contains(body, "signalbox_agent_deltas_applied_total 3") {
		t.Errorf("/metrics: %d %s", code, body)
	}
	if code, body, _ := get(t, h, "/proxyMode"); code != http.StatusOK || body != "iptables" {
		t.Errorf("/proxyMode: %d %q", code, body)
	}
	if code, _, _ := get(t, h, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz on the metrics address: %d", code)
	}
}

func get(t *testing.T, h http.Handler, path string) (int, string, http.Header) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(body), rec.Result().Header
}

func value(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
