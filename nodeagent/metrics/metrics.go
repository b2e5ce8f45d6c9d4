// Package metrics holds the node agent's Prometheus metrics. Where a metric
// means what a kube-proxy metric means it keeps kube-proxy's name, so
// existing dashboards and alerts keep working when a node switches to
// signalbox; the agent's own stream metrics are prefixed signalbox_agent_.
//
// Each Metrics owns its registry (never the global default) so tests and
// several agents in one process stay isolated.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Unlike kube-proxy the sync metrics carry no ip_family label: one
// signalbox transaction programs both families at once, so a per-family
// split would report the same duration twice.

// syncBuckets match kube-proxy's: 1ms doubling up to about 16s.
var syncBuckets = prometheus.ExponentialBuckets(0.001, 2, 15)

// programmingBuckets match kube-proxy's network programming latency
// buckets: fine below a minute, coarse up to five minutes, because the SLO
// is stated in seconds.
func programmingBuckets() []float64 {
	b := []float64{0.25, 0.5}
	b = append(b, prometheus.LinearBuckets(1, 1, 59)...)
	b = append(b, prometheus.LinearBuckets(60, 5, 12)...)
	return append(b, prometheus.LinearBuckets(120, 30, 7)...)
}

// Metrics are the agent's metrics. Fields are exported so callers record
// directly; the helpers below keep related metrics consistent.
type Metrics struct {
	registry *prometheus.Registry

	SyncDuration        prometheus.Histogram
	FullSyncDuration    prometheus.Histogram
	PartialSyncDuration prometheus.Histogram
	NetworkProgramming  prometheus.Histogram
	LastSyncTimestamp   prometheus.Gauge
	LastQueuedTimestamp prometheus.Gauge
	SyncFailures        prometheus.Counter
	Rules               *prometheus.GaugeVec
	HealthzTotal        *prometheus.CounterVec
	LivezTotal          *prometheus.CounterVec

	StreamConnected   prometheus.Gauge
	DeltasApplied     prometheus.Counter
	Nacks             prometheus.Counter
	Reconnects        prometheus.Counter
	ConntrackCleanups prometheus.Counter
	PeriodicSyncs     prometheus.Counter
}

// New creates the metrics and registers them on a fresh registry.
func New() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kubeproxy_sync_proxy_rules_duration_seconds",
			Help:    "SyncProxyRules latency in seconds (full and partial transactions)",
			Buckets: syncBuckets,
		}),
		FullSyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kubeproxy_sync_full_proxy_rules_duration_seconds",
			Help:    "SyncProxyRules latency in seconds for full resyncs",
			Buckets: syncBuckets,
		}),
		PartialSyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
			Help:    "SyncProxyRules latency in seconds for partial resyncs",
			Buckets: syncBuckets,
		}),
		NetworkProgramming: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kubeproxy_network_programming_duration_seconds",
			Help:    "In Cluster Network Programming Latency in seconds, from the change's trigger time to rules applied",
			Buckets: programmingBuckets(),
		}),
		LastSyncTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
			Help: "The last time proxy rules were successfully synced",
		}),
		LastQueuedTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
			Help: "The last time a change was received for the data plane",
		}),
		SyncFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signalbox_agent_sync_failures_total",
			Help: "Data plane transactions that failed",
		}),
		Rules: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "signalbox_agent_rules",
			Help: "Kernel objects (rules, virtual servers, set elements) owned by the data plane, as kubeproxy_sync_proxy_rules_iptables_total counts rules",
		}, []string{"backend"}),
		HealthzTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubeproxy_proxy_healthz_total",
			Help: "Cumulative proxy healthz HTTP status",
		}, []string{"code"}),
		LivezTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubeproxy_proxy_livez_total",
			Help: "Cumulative proxy livez HTTP status",
		}, []string{"code"}),
		StreamConnected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "signalbox_agent_stream_connected",
			Help: "1 while the stream to the control plane is open, else 0",
		}),
		DeltasApplied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signalbox_agent_deltas_applied_total",
			Help: "Deltas applied and acknowledged",
		}),
		Nacks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signalbox_agent_nacks_total",
			Help: "Deltas rejected (bad delta or data plane failure)",
		}),
		Reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signalbox_agent_reconnects_total",
			Help: "Attempts to reopen the stream after it ended or failed",
		}),
		ConntrackCleanups: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signalbox_agent_conntrack_cleanups_total",
			Help: "Stale conntrack entries deleted",
		}),
		PeriodicSyncs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signalbox_agent_periodic_syncs_total",
			Help: "Periodic full syncs that restore the held table in the kernel",
		}),
	}
	m.registry.MustRegister(
		m.SyncDuration, m.FullSyncDuration, m.PartialSyncDuration,
		m.NetworkProgramming, m.LastSyncTimestamp, m.LastQueuedTimestamp,
		m.SyncFailures, m.Rules, m.HealthzTotal, m.LivezTotal,
		m.StreamConnected, m.DeltasApplied, m.Nacks, m.Reconnects,
		m.ConntrackCleanups, m.PeriodicSyncs,
	)
	return m
}

// RegisterRuntime adds the Go runtime and process collectors, as kube-proxy
// exposes them. Kept out of New so unit tests do not read /proc.
func (m *Metrics) RegisterRuntime() {
	m.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
}

// Registry returns the registry the metrics live on.
func (m *Metrics) Registry() *prometheus.Registry { return m.registry }

// Handler serves the registry in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{Registry: m.registry})
}

// ObserveSync records one successful data plane transaction that finished
// at `at`. full is true for a Sync (whole table), false for an incremental
// Apply.
func (m *Metrics) ObserveSync(full bool, d time.Duration, at time.Time) {
	m.SyncDuration.Observe(d.Seconds())
	if full {
		m.FullSyncDuration.Observe(d.Seconds())
	} else {
		m.PartialSyncDuration.Observe(d.Seconds())
	}
	m.LastSyncTimestamp.Set(float64(at.UnixNano()) / 1e9)
}

// ObserveProgramming records the latency from a change's trigger time to
// its rules being live. A trigger in the future (clock skew between the
// control plane's cluster and this node) is dropped rather than recorded as
// zero.
func (m *Metrics) ObserveProgramming(trigger, applied time.Time) {
	if trigger.IsZero() || applied.Before(trigger) {
		return
	}
	m.NetworkProgramming.Observe(applied.Sub(trigger).Seconds())
}
