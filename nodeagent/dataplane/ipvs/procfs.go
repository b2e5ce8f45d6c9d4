package ipvs

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// procIPVS is the namespace's IPVS table as /proc/net/ip_vs lists it.
//
// Sync reads real servers from there rather than with one netlink dump per
// virtual server: IPVS has no dump of all destinations, and a thousand
// dumps cost seconds where one read of this file costs milliseconds.
// Virtual servers still come from netlink, which alone reports every flag.
const procIPVS = "/proc/net/ip_vs"

// realServer is what the file says about one destination.
type realServer struct {
	weight, conns int
}

// parseProcIPVS parses /proc/net/ip_vs (net/netfilter/ipvs/ip_vs_ctl.c,
// ip_vs_info_seq_show):
//
//	TCP  C6126401:0050 rr persistent 600 FFFFFFFF
//	  -> C6130001:1F90      Masq    1      0          0
//	TCP  [2001:0002:0000:0000:0000:0000:0000:0100]:0050 rr
//	  -> [2001:0002:0001:...:0001]:1F90      Masq    1      0          0
//
// Firewall-mark services (FWM) are skipped with their destinations.
func parseProcIPVS(text string) (map[VSKey]map[RSKey]realServer, error) {
	out := map[VSKey]map[RSKey]realServer{}
	var cur map[RSKey]realServer
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for line := 1; sc.Scan(); line++ {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 6 && f[0] == "->":
			if cur == nil {
				continue // a destination of a skipped service
			}
			a, port, err := parseHexAddrPort(f[1])
			weight, err2 := strconv.Atoi(f[3])
			active, err3 := strconv.Atoi(f[4])
			inactive, err4 := strconv.Atoi(f[5])
			if err != nil || err2 != nil || err3 != nil || err4 != nil {
				return nil, fmt.Errorf("ipvs: %s line %d: bad destination %q", procIPVS, line, sc.Text())
			}
			cur[RSKey{a, port}] = realServer{weight, active + inactive}
		case len(f) >= 3 && (f[0] == "TCP" || f[0] == "UDP" || f[0] == "SCTP"):
			a, port, err := parseHexAddrPort(f[1])
			if err != nil {
				return nil, fmt.Errorf("ipvs: %s line %d: bad service %q", procIPVS, line, sc.Text())
			}
			proto := map[string]Proto{"TCP": TCP, "UDP": UDP, "SCTP": SCTP}[f[0]]
			cur = map[RSKey]realServer{}
			out[VSKey{a, proto, port}] = cur
		default:
			cur = nil // headers and FWM services
		}
	}
	return out, sc.Err()
}

// parseHexAddrPort parses C6126401:0050 and [2001:0002::...]:0050.
func parseHexAddrPort(s string) (netip.Addr, uint16, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.Addr{}, 0, fmt.Errorf("no port in %q", s)
	}
	port, err := strconv.ParseUint(s[i+1:], 16, 16)
	if err != nil {
		return netip.Addr{}, 0, err
	}
	host := s[:i]
	if strings.HasPrefix(host, "[") {
		a, err := netip.ParseAddr(strings.Trim(host, "[]"))
		return a, uint16(port), err
	}
	b, err := hex.DecodeString(host)
	if err != nil || len(b) != 4 {
		return netip.Addr{}, 0, fmt.Errorf("bad IPv4 address %q", host)
	}
	return netip.AddrFrom4([4]byte(b)), uint16(port), nil
}
