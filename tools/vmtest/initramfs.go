package vmtest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

//go:embed init.sh
var initScript []byte

// bootModules are needed before the host root is mounted, so their files
// (and those of their dependencies) travel inside the initramfs.
var bootModules = []string{"virtio_pci", "9pnet_virtio", "9p"}

// Modules loaded (with dependencies) from the 9p-mounted kernel tree
// before the command starts. Order matters only for crc32c_generic, which
// must come before libcrc32c users (busybox modprobe ignores softdeps).
var (
	baseModules = []string{"crc32c_generic", "overlay", "virtio_net", "dummy", "veth", "nfnetlink", "nf_conntrack", "nf_conntrack_netlink", "nf_nat"}
	ipvsModules = []string{"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_lc", "ip_vs_wlc",
		"ip_vs_lblc", "ip_vs_lblcr", "ip_vs_dh", "ip_vs_sed", "ip_vs_nq", "ip_vs_fo", "ip_vs_ovf", "ip_vs_mh"}
	ipsetModules = []string{"ip_set", "ip_set_bitmap_ip", "ip_set_bitmap_ipmac", "ip_set_bitmap_port",
		"ip_set_hash_ip", "ip_set_hash_ipmac", "ip_set_hash_ipmark", "ip_set_hash_ipport", "ip_set_hash_ipportip",
		"ip_set_hash_ipportnet", "ip_set_hash_mac", "ip_set_hash_net", "ip_set_hash_netiface", "ip_set_hash_netnet",
		"ip_set_hash_netport", "ip_set_hash_netportnet", "ip_set_list_set"}
	// What iptables-legacy and iptables-nft need for kube-proxy style rules.
	xtablesModules = []string{"x_tables", "ip_tables", "ip6_tables", "xt_tcpudp", "xt_statistic", "xt_recent",
		"xt_comment", "xt_mark", "xt_MASQUERADE", "xt_addrtype", "xt_conntrack", "xt_set", "xt_multiport", "xt_nat",
		"xt_ipvs", "iptable_nat", "iptable_filter", "iptable_mangle", "iptable_raw",
		"ip6table_nat", "ip6table_filter", "ip6table_mangle", "ip6table_raw",
		"nf_reject_ipv4", "nf_reject_ipv6", "ipt_REJECT", "ip6t_REJECT"}
	nftablesModules = []string{"nf_tables", "nft_compat", "nft_chain_nat", "nft_ct", "nft_nat", "nft_masq",
		"nft_reject", "nft_reject_inet", "nft_reject_ipv4", "nft_reject_ipv6", "nft_fib", "nft_fib_inet",
		"nft_fib_ipv4", "nft_fib_ipv6", "nft_numgen", "nft_limit", "nft_hash"}
)

// Modules is the list loaded before every command, in load order.
func Modules() []string {
	var all []string
	for _, l := range [][]string{baseModules, ipvsModules, ipsetModules, xtablesModules, nftablesModules} {
		all = append(all, l...)
	}
	return all
}

// moduleIndex is what we need from depmod's output.
type moduleIndex struct {
	path    map[string]string   // name -> path relative to the modules dir
	deps    map[string][]string // name -> paths of all dependencies, as modules.dep lists them
	builtin map[string]bool
}

func moduleName(path string) string {
	base := filepath.Base(path)
	base = base[:strings.Index(base, ".ko")]
	return strings.ReplaceAll(base, "-", "_")
}

func readModuleIndex(modDir string) (*moduleIndex, error) {
	idx := &moduleIndex{path: map[string]string{}, deps: map[string][]string{}, builtin: map[string]bool{}}
	dep, err := os.ReadFile(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(bytes.NewReader(dep))
	for sc.Scan() {
		mod, deps, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		n := moduleName(mod)
		idx.path[n] = mod
		idx.deps[n] = strings.Fields(deps)
	}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			idx.builtin[moduleName(l)] = true
		}
	}
	return idx, nil
}

// loadOrder returns the module files to insmod, dependencies first. depmod
// lists a module's dependencies so that loading them back to front works.
func (idx *moduleIndex) loadOrder(names []string) ([]string, error) {
	var order []string
	seen := map[string]bool{}
	for _, n := range names {
		p, ok := idx.path[n]
		if !ok {
			return nil, fmt.Errorf("vmtest: module %s not in modules.dep", n)
		}
		chain := append([]string{p}, idx.deps[n]...)
		for i := len(chain) - 1; i >= 0; i-- {
			if !seen[chain[i]] {
				seen[chain[i]] = true
				order = append(order, chain[i])
			}
		}
	}
	return order, nil
}

func (idx *moduleIndex) check(names []string) error {
	var missing []string
	for _, n := range names {
		if _, ok := idx.path[n]; !ok && !idx.builtin[n] {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("vmtest: kernel lacks modules: %s", strings.Join(missing, " "))
	}
	return nil
}

// EnsureInitramfs builds (once per content) the initramfs for kernel k and
// returns its path. It holds busybox, the boot modules and init.sh.
func EnsureInitramfs(k Kernel) (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	if strings.ContainsAny(k.ModulesDir(), " \t\n'\"") {
		return "", fmt.Errorf("vmtest: path %q must not contain spaces or quotes (it is passed to the VM's shell)", k.ModulesDir())
	}
	idx, err := readModuleIndex(k.ModulesDir())
	if err != nil {
		return "", err
	}
	if err := idx.check(Modules()); err != nil {
		return "", err
	}
	boot, err := idx.loadOrder(bootModules)
	if err != nil {
		return "", err
	}
	busybox, err := os.ReadFile(busyboxPath)
	if err != nil {
		return "", err
	}
	if !isStaticELF(busyboxPath) {
		return "", fmt.Errorf("vmtest: %s is not statically linked; install busybox-static", busyboxPath)
	}

	conf := fmt.Sprintf("KREL=%s\nKMODS=%s\nMODULES=%q\n", k.Release, k.ModulesDir(), strings.Join(Modules(), " "))
	var order strings.Builder
	var c cpioWriter
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "lib", "lib/modules", "vmtest", "vmtest/ko"} {
		c.dir(d)
	}
	c.charDev("dev/console", 5, 1) // the kernel opens it for init's stdio before devtmpfs is mounted
	c.file("bin/busybox", 0o755, busybox)
	c.file("init", 0o755, initScript)
	c.file("vmtest/conf", 0o644, []byte(conf))
	for _, rel := range boot {
		if !strings.HasSuffix(rel, ".ko") {
			return "", fmt.Errorf("vmtest: compressed module %s: busybox insmod cannot load it", rel)
		}
		b, err := os.ReadFile(filepath.Join(k.ModulesDir(), rel))
		if err != nil {
			return "", err
		}
		c.file("vmtest/ko/"+moduleName(rel)+".ko", 0o644, b)
		fmt.Fprintln(&order, moduleName(rel))
	}
	c.file("vmtest/ko/order", 0o644, []byte(order.String()))
	img := c.finish()

	sum := sha256.Sum256(img)
	path := filepath.Join(cache, "initramfs-"+hex.EncodeToString(sum[:8])+".cpio")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	tmp := fmt.Sprintf("%s.tmp%d", path, os.Getpid())
	if err := os.WriteFile(tmp, img, 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", err
	}
	// Older images belong to older versions of this code. A VM still
	// booting from one has read it already.
	old, _ := filepath.Glob(filepath.Join(cache, "initramfs-*.cpio"))
	for _, o := range old {
		if o != path {
			os.Remove(o)
		}
	}
	return path, nil
}

// cpioWriter writes the "newc" format the kernel unpacks. Uncompressed,
// because inflating under TCG would cost more than copying does.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (c *cpioWriter) entry(name string, mode uint32, data []byte, rdevMajor, rdevMinor int) {
	c.ino++
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	// Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check.
	// mtime is 0 so that identical content gives identical bytes (and cache key).
	fmt.Fprintf(&c.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.buf.WriteString(name)
	c.buf.WriteByte(0)
	c.pad()
	c.buf.Write(data)
	c.pad()
}

func (c *cpioWriter) pad() {
	for c.buf.Len()%4 != 0 {
		c.buf.WriteByte(0)
	}
}

func (c *cpioWriter) dir(name string)                         { c.entry(name, 0o040755, nil, 0, 0) }
func (c *cpioWriter) file(name string, perm uint32, b []byte) { c.entry(name, 0o100000|perm, b, 0, 0) }
func (c *cpioWriter) charDev(name string, major, minor int) {
	c.entry(name, 0o020600, nil, major, minor)
}

func (c *cpioWriter) finish() []byte {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	return c.buf.Bytes()
}
