package hub

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the hub's Prometheus metrics.
type Metrics struct {
	Connected  prometheus.Gauge
	Generation prometheus.Gauge
	DeltasSent prometheus.Counter
	BytesSent  prometheus.Counter
	Acks       prometheus.Counter
	Nacks      prometheus.Counter
	Skipped    prometheus.Counter
}

// NewMetrics creates the metrics and registers them with reg (nil: none).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Connected:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "signalbox_controlplane_agents_connected", Help: "Agent streams open."}),
		Generation: prometheus.NewGauge(prometheus.GaugeOpts{Name: "signalbox_controlplane_generation", Help: "Current table generation."}),
		DeltasSent: prometheus.NewCounter(prometheus.CounterOpts{Name: "signalbox_controlplane_deltas_sent_total", Help: "Deltas sent to agents."}),
		BytesSent:  prometheus.NewCounter(prometheus.CounterOpts{Name: "signalbox_controlplane_delta_bytes_sent_total", Help: "Bytes of deltas sent to agents."}),
		Acks:       prometheus.NewCounter(prometheus.CounterOpts{Name: "signalbox_controlplane_acks_total", Help: "Deltas acknowledged."}),
		Nacks:      prometheus.NewCounter(prometheus.CounterOpts{Name: "signalbox_controlplane_nacks_total", Help: "Deltas rejected."}),
		Skipped:    prometheus.NewCounter(prometheus.CounterOpts{Name: "signalbox_controlplane_skipped_objects_total", Help: "Bad objects or fields skipped while building tables."}),
	}
	if reg != nil {
		reg.MustRegister(m.Connected, m.Generation, m.DeltasSent, m.BytesSent, m.Acks, m.Nacks, m.Skipped)
	}
	return m
}
