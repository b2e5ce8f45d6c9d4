// Package healthcheck serves the node agent's HTTP health surfaces with
// kube-proxy's semantics: the agent's own /healthz and /livez, the
// per-Service health check node ports that load balancers probe for
// externalTrafficPolicy Local Services, and /metrics.
package healthcheck

import (
	"encoding/json"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/signalbox/signalbox/nodeagent/metrics"
)

// Health is the agent's health as /healthz and /livez report it. The JSON
// field names are kube-proxy's, so probes and scripts written for it work.
type Health struct {
	LastUpdated time.Time `json:"lastUpdated"`
	CurrentTime time.Time `json:"currentTime"`
	Healthy     bool      `json:"healthy"`
}

// Tracker decides whether rule programming is stale. The agent calls
// QueuedUpdate when a change arrives and Updated once the change is live;
// the agent is unhealthy while a change has waited longer than the timeout.
// A fresh agent with nothing pending is healthy, as in kube-proxy: it is
// starting up, not stuck.
type Tracker struct {
	timeout time.Duration
	now     func() time.Time

	mu            sync.Mutex
	lastUpdated   time.Time
	oldestPending time.Time // zero when nothing is pending
}

// NewTracker returns a Tracker. now may be nil for the wall clock; tests
// pass a fake clock.
func NewTracker(timeout time.Duration, now func() time.Time) *Tracker {
	if now == nil {
		now = time.Now
	}
	return &Tracker{timeout: timeout, now: now}
}

// QueuedUpdate records that a change is waiting to be programmed. Only the
// oldest pending change counts: later ones must not push the deadline out.
func (t *Tracker) QueuedUpdate() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.oldestPending.IsZero() {
		t.oldestPending = t.now()
	}
}

// Updated records that the kernel now holds every change received.
func (t *Tracker) Updated() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.oldestPending = time.Time{}
	t.lastUpdated = t.now()
}

// Health returns the current health.
func (t *Tracker) Health() Health {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	stale := !t.oldestPending.IsZero() && now.Sub(t.oldestPending) >= t.timeout
	return Health{LastUpdated: t.lastUpdated, CurrentTime: now, Healthy: !stale}
}

// HealthHandler serves /healthz and /livez. m may be nil.
//
// kube-proxy's /healthz also fails when the Node is being deleted by the
// cluster autoscaler; the agent does not watch its Node, so here both
// endpoints report rule programming only.
func HealthHandler(t *Tracker, m *metrics.Metrics) http.Handler {
	mux := http.NewServeMux()
	var healthz, livez *prometheus.CounterVec
	if m != nil {
		healthz, livez = m.HealthzTotal, m.LivezTotal
	}
	mux.Handle("/healthz", healthHandler{t: t, count: healthz})
	mux.Handle("/livez", healthHandler{t: t, count: livez})
	return mux
}

// MetricsHandler serves /metrics plus /healthz, /livez and /proxyMode, as
// kube-proxy's metrics address does.
func MetricsHandler(t *Tracker, m *metrics.Metrics, mode string) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	health := HealthHandler(t, m)
	mux.Handle("/healthz", health)
	mux.Handle("/livez", health)
	mux.HandleFunc("/proxyMode", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		_, _ = w.Write([]byte(mode))
	})
	return mux
}

type healthHandler struct {
	t     *Tracker
	count *prometheus.CounterVec // nil without metrics
}

func (h healthHandler) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	health := h.t.Health()
	code := http.StatusServiceUnavailable
	if health.Healthy {
		code = http.StatusOK
		// kube-proxy reports "now" as lastUpdated while healthy, because
		// older releases updated it on every idle sync loop and clients
		// compare it with the current time.
		health.LastUpdated = health.CurrentTime
	}
	if h.count != nil {
		h.count.WithLabelValues(strconv.Itoa(code)).Inc()
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	body, _ := json.Marshal(health)
	_, _ = w.Write(body)
}
