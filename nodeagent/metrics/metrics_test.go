package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func histogram(t *testing.T, h prometheus.Histogram) (count uint64, sum float64) {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

func gauge(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}

// Registries are separate: two agents (or tests) never share counts, and
// creating a second set does not panic on duplicate registration.
func TestRegistriesAreIsolated(t *testing.T) {
	a, b := New(), New()
	a.Nacks.Inc()
	families, err := b.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "signalbox_agent_nacks_total" && f.GetMetric()[0].GetCounter().GetValue() != 0 {
			t.Error("a NACK on one Metrics shows on another")
		}
	}
}

func TestObserveSyncSplitsFullAndPartial(t *testing.T) {
	m := New()
	at := time.Unix(1_700_000_000, 500_000_000)
	m.ObserveSync(true, 2*time.Second, at)
	m.ObserveSync(false, 10*time.Millisecond, at.Add(time.Second))
	m.ObserveSync(false, 20*time.Millisecond, at.Add(2*time.Second))
	for _, tc := range []struct {
		name  string
		h     prometheus.Histogram
		count uint64
		sum   float64
	}{
		{"all", m.SyncDuration, 3, 2.03},
		{"full", m.FullSyncDuration, 1, 2},
		{"partial", m.PartialSyncDuration, 2, 0.03},
	} {
		count, sum := histogram(t, tc.h)
		if count != tc.count || sum < tc.sum-1e-9 || sum > tc.sum+1e-9 {
			t.Errorf("%s: count %d sum %v, want %d and %v", tc.name, count, sum, tc.count, tc.sum)
		}
	}
	if got := gauge(t, m.LastSyncTimestamp); got != 1_700_000_002.5 {
		t.Errorf("last timestamp = %v", got)
	}
}

func TestObserveProgramming(t *testing.T) {
	m := New()
	now := time.Now()
	m.ObserveProgramming(now.Add(-1500*time.Millisecond), now)
	m.ObserveProgramming(now.Add(time.Second), now) // clock skew: dropped
	m.ObserveProgramming(time.Time{}, now)          // no trigger time: dropped
	count, sum := histogram(t, m.NetworkProgramming)
	if count != 1 || sum != 1.5 {
		t.Errorf("count %d sum %v, want 1 and 1.5", count, sum)
	}
}

// The exposition carries kube-proxy's names, so existing dashboards work.
func TestHandlerExposesKubeProxyNames(t *testing.T) {
	m := New()
	m.ObserveSync(true, time.Millisecond, time.Now())
	m.ObserveProgramming(time.Now().Add(-time.Second), time.Now())
	m.Rules.WithLabelValues("iptables-legacy").Set(42)
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	for _, want := range []string{
		"kubeproxy_sync_proxy_rules_duration_seconds_bucket",
		"kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
		"kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
		"kubeproxy_network_programming_duration_seconds_count 1",
		"kubeproxy_sync_proxy_rules_last_timestamp_seconds",
		`signalbox_agent_rules{backend="iptables-legacy"} 42`,
		"signalbox_agent_stream_connected 0",
		"signalbox_agent_deltas_applied_total 0",
		"signalbox_agent_nacks_total 0",
		"signalbox_agent_reconnects_total 0",
		"signalbox_agent_conntrack_cleanups_total 0",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("exposition lacks %q", want)
		}
	}
}
