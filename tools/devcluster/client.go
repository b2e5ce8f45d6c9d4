package devcluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// RESTConfig returns a fresh admin config; callers may modify it. In a
// network namespace it dials from inside that namespace.
func (c *Cluster) RESTConfig() *rest.Config {
	cfg := &rest.Config{
		Host:            c.Host,
		BearerToken:     c.AdminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: append([]byte(nil), c.caPEM...)},
		// The default 5 QPS would make a test creating thousands of objects
		// crawl; the apiserver belongs to us.
		QPS:   1000,
		Burst: 2000,
	}
	if c.NetNS != "" {
		cfg.Dial = c.dial
	}
	return cfg
}

// Client returns an admin clientset. The config is generated here and
// always valid, so an error would be a bug in this package: it panics.
func (c *Cluster) Client() kubernetes.Interface {
	cs, err := kubernetes.NewForConfig(c.RESTConfig())
	if err != nil {
		panic(fmt.Sprintf("devcluster: client for %s: %v", c.Host, err))
	}
	return cs
}

// DialContext dials like net.Dialer, from inside the cluster's network
// namespace when it has one.
func (c *Cluster) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return c.dial(ctx, network, address)
}

// CAPEM returns the cluster CA certificate in PEM form.
func (c *Cluster) CAPEM() []byte { return append([]byte(nil), c.caPEM...) }

func (c *Cluster) writeKubeconfig() error {
	name := "signalbox-" + c.Name
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = &clientcmdapi.Cluster{Server: c.Host, CertificateAuthorityData: c.caPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: c.AdminToken}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: "admin"}
	cfg.CurrentContext = name
	return clientcmd.WriteToFile(*cfg, c.Kubeconfig)
}

// waitHTTP polls url until it answers 200, p exits, or timeout passes.
// The error names the last answer and ends with the tail of p's log,
// which is where the reason almost always is.
func (c *Cluster) waitHTTP(ctx context.Context, p *proc, url string, timeout time.Duration) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.caPEM)
	client := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext:     c.dial,
			TLSClientConfig: &tls.Config{RootCAs: pool},
		},
	}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := "no answer yet"
	for {
		ok, answer := probe(ctx, client, url, c.AdminToken)
		if ok {
			return nil
		}
		if answer != "" {
			last = answer
		}
		select {
		case <-p.done:
			return c.failure(p, fmt.Sprintf("%s exited (%v) before %s answered", p.name, p.waitErr, url))
		case <-ctx.Done():
			return c.failure(p, fmt.Sprintf("%s not ready after %s: %v; last answer from %s: %s", p.name, timeout, ctx.Err(), url, last))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func probe(ctx context.Context, client *http.Client, url, token string) (bool, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false, err.Error()
	}
	if strings.HasPrefix(url, "https:") {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode == http.StatusOK {
		return true, ""
	}
	return false, fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
}

func (c *Cluster) failure(p *proc, msg string) error {
	log := tail(p.logPath, 30)
	err := fmt.Errorf("%s\n--- last lines of %s ---\n%s", msg, p.logPath, log)
	if strings.Contains(log, "address already in use") {
		err = errors.Join(errPortInUse, err)
	}
	return err
}
