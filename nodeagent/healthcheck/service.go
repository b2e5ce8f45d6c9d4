package healthcheck

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// ServiceServer runs the health check node ports of externalTrafficPolicy
// Local Services: one HTTP server per Service, IP family and node address.
// A load balancer probes it to learn whether this node has a local endpoint
// (200) or must not receive traffic (503).
type ServiceServer struct {
	cidrs   []string
	healthy func() bool
	log     *slog.Logger
	ifAddrs func() ([]net.Addr, error)

	mu        sync.Mutex
	instances map[serviceKey]*instance
}

// ServiceConfig configures a ServiceServer.
type ServiceConfig struct {
	// NodePortAddresses are CIDRs whose node addresses the health check
	// ports listen on. Empty means the table's NodeSettings decide, and
	// if they are empty too, every address (":PORT").
	NodePortAddresses []string
	// Healthy reports whether the agent's rule programming is current
	// (serviceProxyHealthy); nil means always healthy.
	Healthy func() bool
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// serviceKey names one Service in one family: dual-stack Services get a
// socket per family on the same port, as kube-proxy runs one proxier per
// family.
type serviceKey struct {
	namespace, name string
	family          pb.IPFamily
}

type instance struct {
	key       serviceKey
	port      int32
	addrs     string // listen addresses joined; a change reopens the servers
	servers   []*http.Server
	listeners []net.Listener
	endpoints atomic.Int32
	healthy   func() bool
}

// NewServiceServer returns a ServiceServer serving nothing until Sync.
func NewServiceServer(cfg ServiceConfig) *ServiceServer {
	s := &ServiceServer{
		cidrs:     cfg.NodePortAddresses,
		healthy:   cfg.Healthy,
		log:       cfg.Logger,
		ifAddrs:   net.InterfaceAddrs,
		instances: map[serviceKey]*instance{},
	}
	if s.healthy == nil {
		s.healthy = func() bool { return true }
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s
}

type wanted struct {
	port      int32
	endpoints int32
}

// Sync opens, closes and updates health check servers to match t. A port
// that cannot be opened is reported in the error and retried on the next
// Sync; the others are served regardless.
func (s *ServiceServer) Sync(t pb.Table) error {
	want := map[serviceKey]wanted{}
	var settingsCIDRs []string
	for _, r := range t {
		if ns := r.GetNodeSettings(); ns != nil {
			settingsCIDRs = ns.GetNodePortAddresses()
		}
		sp := r.GetServicePort()
		if sp.GetHealthCheckNodePort() <= 0 {
			continue
		}
		k := serviceKey{sp.GetNamespace(), sp.GetName(), sp.GetFamily()}
		w := want[k]
		w.port = sp.GetHealthCheckNodePort()
		// Every port of a Service carries the same local endpoint count
		// in practice; max keeps the answer stable if ports disagree.
		w.endpoints = max(w.endpoints, sp.GetLocalReadyEndpoints())
		want[k] = w
	}
	cidrs := s.cidrs
	if len(cidrs) == 0 {
		cidrs = settingsCIDRs
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	addrsByFamily := map[pb.IPFamily][]string{}
	for k, w := range want {
		addrs, ok := addrsByFamily[k.family]
		if !ok {
			addrs = s.listenHosts(k.family, cidrs)
			addrsByFamily[k.family] = addrs
		}
		joined := strings.Join(addrs, ",")
		if in := s.instances[k]; in != nil && (in.port != w.port || in.addrs != joined) {
			s.closeInstance(in)
		}
		in := s.instances[k]
		if in == nil {
			var err error
			if in, err = s.open(k, w.port, addrs); err != nil {
				errs = append(errs, err)
				continue
			}
			in.addrs = joined
			s.instances[k] = in
		}
		in.endpoints.Store(w.endpoints)
	}
	for k, in := range s.instances {
		if _, ok := want[k]; !ok {
			s.closeInstance(in)
		}
	}
	return errors.Join(errs...)
}

// Close stops every health check server.
func (s *ServiceServer) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, in := range s.instances {
		s.closeInstance(in)
	}
}

// Ports returns the open health check ports by "namespace/name", for
// logs and tests.
func (s *ServiceServer) Ports() map[string]int32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int32{}
	for k, in := range s.instances {
		out[k.namespace+"/"+k.name] = in.port
	}
	return out
}

func (s *ServiceServer) closeInstance(in *instance) {
	for _, srv := range in.servers {
		_ = srv.Close()
	}
	// Serve may not have started yet, in which case Server.Close does not
	// know the listener; closing it here frees the port before returning.
	for _, l := range in.listeners {
		_ = l.Close()
	}
	delete(s.instances, in.key)
	s.log.Info("closed service health check", "service", in.key.namespace+"/"+in.key.name, "port", in.port)
}

// open listens on every address before serving any, so a port conflict
// leaves nothing half open and the next Sync retries cleanly.
func (s *ServiceServer) open(k serviceKey, port int32, hosts []string) (*instance, error) {
	network := "tcp"
	switch k.family {
	case pb.IPFamily_IP_FAMILY_IPV4:
		network = "tcp4"
	case pb.IPFamily_IP_FAMILY_IPV6:
		network = "tcp6"
	}
	in := &instance{key: k, port: port, healthy: s.healthy}
	var listeners []net.Listener
	for _, h := range hosts {
		l, err := net.Listen(network, net.JoinHostPort(h, strconv.Itoa(int(port))))
		if err != nil {
			for _, l := range listeners {
				_ = l.Close()
			}
			return nil, fmt.Errorf("health check for service %s/%s on port %d: %w", k.namespace, k.name, port, err)
		}
		listeners = append(listeners, l)
	}
	in.listeners = listeners
	for _, l := range listeners {
		srv := &http.Server{Handler: in, ReadHeaderTimeout: 10 * time.Second}
		in.servers = append(in.servers, srv)
		go func() { _ = srv.Serve(l) }() // returns ErrServerClosed on Close
	}
	s.log.Info("opened service health check", "service", k.namespace+"/"+k.name, "port", port, "addresses", hosts)
	return in, nil
}

// listenHosts returns the node addresses of family inside cidrs, or the
// family's unspecified address when cidrs is empty. When cidrs match no
// address the agent listens everywhere rather than not at all, as
// kube-proxy does, so load balancers still get an answer.
func (s *ServiceServer) listenHosts(family pb.IPFamily, cidrs []string) []string {
	unspecified := "0.0.0.0"
	if family == pb.IPFamily_IP_FAMILY_IPV6 {
		unspecified = "::"
	}
	if len(cidrs) == 0 {
		return []string{unspecified}
	}
	var prefixes []netip.Prefix
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			s.log.Warn("ignoring node port address that is not a CIDR", "value", c)
			continue
		}
		prefixes = append(prefixes, p.Masked())
	}
	addrs, err := s.ifAddrs()
	if err != nil {
		s.log.Error("listing node addresses; health checks listen on all", "err", err)
		return []string{unspecified}
	}
	var hosts []string
	for _, a := range addrs {
		ipnet, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipnet.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() != (family != pb.IPFamily_IP_FAMILY_IPV6) {
			continue
		}
		for _, p := range prefixes {
			if p.Contains(ip) {
				hosts = append(hosts, ip.String())
				break
			}
		}
	}
	if len(hosts) == 0 {
		s.log.Error("no node address matches the node port addresses; health checks listen on all", "cidrs", cidrs)
		return []string{unspecified}
	}
	slices.Sort(hosts)
	return slices.Compact(hosts)
}

// ServeHTTP answers a load balancer's probe with kube-proxy's headers and
// body layout, byte for byte where names are plain DNS labels.
func (in *instance) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	count := in.endpoints.Load()
	healthy := in.healthy()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(int(count)))
	if count > 0 && healthy {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	ns, _ := json.Marshal(in.key.namespace)
	name, _ := json.Marshal(in.key.name)
	fmt.Fprintf(w, "{\n\t\"service\": {\n\t\t\"namespace\": %s,\n\t\t\"name\": %s\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %t\n}",
		ns, name, count, healthy)
}
