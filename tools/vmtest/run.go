package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Options configure one VM run. The zero value is usable.
type Options struct {
	Memory   string            // qemu -m; default "2048M"
	CPUs     int               // vCPUs, one TCG thread each; default 2
	Env      map[string]string // added to the command's environment
	Dir      string            // working directory inside the VM; default: the caller's, which the VM sees through the shared root
	Timeout  time.Duration     // for boot and command together; default 10 minutes
	HostPort int               // 0: no network at all; else the guest reaches 127.0.0.1:HostPort on the host by dialing GuestServerAddr
	Stdout   io.Writer         // if set, receives the console (boot and command) live
	Logf     Logf              // if set, receives setup progress (apt, downloads)
	Verbose  bool              // boot without "quiet", to debug a VM that does not come up
}

// Result of a command that ran to completion inside the VM.
type Result struct {
	ExitCode int
	Output   string        // the command's stdout and stderr, interleaved as on a terminal
	BootTime time.Duration // from starting qemu to starting the command
	Duration time.Duration // from starting qemu to its exit
}

// Addresses of the VM's only network, present when Options.HostPort != 0.
const (
	GuestAddr       = "198.18.250.15"
	GuestServerAddr = "198.18.250.100:9000" // forwarded by qemu to 127.0.0.1:HostPort
)

// InVMEnv is set to "1" in the environment of every command run in the VM.
const InVMEnv = "SIGNALBOX_IN_VM"

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

var envKeyRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Run boots a VM and runs argv in it, inside the host root (read-only) with
// fresh /proc, /sys, /dev, /tmp and /run. An error means the VM did not run
// the command to completion; a failing command is a Result with its code.
func Run(ctx context.Context, opts Options, argv []string) (Result, error) {
	if len(argv) == 0 {
		return Result{}, errors.New("vmtest: empty command")
	}
	if opts.Memory == "" {
		opts.Memory = "2048M"
	}
	if opts.CPUs <= 0 {
		opts.CPUs = 2
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Minute
	}
	if mib, err := memoryMiB(opts.Memory); err != nil || mib < 256 {
		// Below ~100M the VM hangs silently: the uncompressed kernel alone is 65 MB.
		return Result{}, fmt.Errorf("vmtest: Memory %q: want at least 256M (as 512M or 2G)", opts.Memory)
	}
	if opts.HostPort < 0 || opts.HostPort > 65535 {
		return Result{}, fmt.Errorf("vmtest: bad HostPort %d", opts.HostPort)
	}
	if opts.Dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return Result{}, err
		}
		opts.Dir = wd
	}
	if err := EnsureTools(ctx, opts.Logf); err != nil {
		return Result{}, err
	}
	k, err := EnsureKernel(ctx, opts.Logf)
	if err != nil {
		return Result{}, err
	}
	initrd, err := EnsureInitramfs(k)
	if err != nil {
		return Result{}, err
	}
	runDir, nonce, err := writeRunDir(opts, argv)
	if err != nil {
		return Result{}, err
	}
	defer os.RemoveAll(runDir)

	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", qemuArgs(opts, k, initrd, runDir)...)
	// Should this process die, the kernel kills qemu too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return Result{}, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return Result{}, fmt.Errorf("vmtest: start qemu: %w", err)
	}
	// A VM that hangs while booting would otherwise wait for the whole Timeout.
	started := make(chan struct{})
	var bootTimedOut atomic.Bool
	go func() {
		select {
		case <-started:
		case <-time.After(BootTimeout):
			bootTimedOut.Store(true)
			cmd.Process.Kill()
		case <-ctx.Done():
		}
	}()
	con := console{nonce: nonce, live: opts.Stdout, start: start}
	con.read(stdout, func() { close(started) }, func() {
		// The command is done; poweroff -f should end qemu at once.
		time.AfterFunc(10*time.Second, func() { cmd.Process.Kill() })
	})
	waitErr := cmd.Wait()
	res := Result{ExitCode: con.exitCode, Output: con.output.String(), BootTime: con.bootTime, Duration: time.Since(start)}

	tailText := con.tail()
	if strings.TrimSpace(tailText) == "" {
		tailText = "(empty: nothing reached the serial console; unless Options.Verbose is set, the kernel prints only errors)"
	}
	if s := strings.TrimSpace(stderr.String()); s != "" {
		tailText += "\n--- qemu stderr ---\n" + tail(s, 20)
	}
	switch {
	case con.exited:
		return res, nil
	case bootTimedOut.Load():
		return res, fmt.Errorf("vmtest: VM did not boot within %s; console tail:\n%s", BootTimeout, tailText)
	case ctx.Err() != nil:
		return res, fmt.Errorf("vmtest: VM %s after %s (started command: %v); console tail:\n%s",
			ctxReason(ctx), time.Since(start).Round(time.Millisecond), con.started, tailText)
	case con.bootFailure != "":
		return res, fmt.Errorf("vmtest: VM failed to boot: %s; console tail:\n%s", con.bootFailure, tailText)
	case !con.started:
		return res, fmt.Errorf("vmtest: VM failed to boot (qemu: %v); console tail:\n%s", waitErr, tailText)
	default:
		return res, fmt.Errorf("vmtest: VM stopped before the command finished (qemu: %v); console tail:\n%s", waitErr, tailText)
	}
}

// memoryMiB parses qemu's -m size: a number with an optional M or G suffix
// (MiB by default).
func memoryMiB(m string) (int, error) {
	mult := 1
	switch {
	case strings.HasSuffix(m, "G"):
		mult, m = 1024, strings.TrimSuffix(m, "G")
	case strings.HasSuffix(m, "M"):
		m = strings.TrimSuffix(m, "M")
	}
	n, err := strconv.Atoi(m)
	return n * mult, err
}

func ctxReason(ctx context.Context) string {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return "timed out"
	}
	return "canceled"
}

func qemuArgs(opts Options, k Kernel, initrd, runDir string) []string {
	args := []string{
		// KVM fails on these hosts (MSR error); TCG with one thread per vCPU works.
		"-accel", "tcg,thread=multi",
		"-machine", "q35", "-cpu", "qemu64",
		"-smp", strconv.Itoa(opts.CPUs), "-m", opts.Memory,
		"-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
		"-serial", "stdio", "-no-reboot",
		"-kernel", k.Image, "-initrd", initrd,
		"-append", kernelArgs(opts, runDir),
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
	}
	if opts.HostPort == 0 {
		return append(args, "-nic", "none")
	}
	// restrict=on: the guest reaches nothing but the one guestfwd below.
	netdev := fmt.Sprintf("user,id=n0,restrict=on,net=198.18.250.0/24,host=198.18.250.2,guestfwd=tcp:%s-cmd:/bin/busybox nc 127.0.0.1 %d",
		GuestServerAddr, opts.HostPort)
	// romfile= skips the iPXE option ROM: it is not needed and may not be installed.
	return append(args, "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=")
}

func kernelArgs(opts Options, runDir string) string {
	quiet := "quiet "
	if opts.Verbose {
		quiet = ""
	}
	return "console=ttyS0 " + quiet + "panic=-1 vmtest.run=" + runDir
}

// writeRunDir writes the per-run files that init.sh reads through the shared
// host root. They live under the repo's cache: the VM has its own /tmp.
func writeRunDir(opts Options, argv []string) (dir, nonce string, err error) {
	cache, err := CacheDir()
	if err != nil {
		return "", "", err
	}
	b := make([]byte, 12)
	rand.Read(b)
	nonce = hex.EncodeToString(b)
	dir = filepath.Join(cache, "runs", nonce[:12])
	if strings.ContainsAny(dir, " \t\n'\"") {
		return "", "", fmt.Errorf("vmtest: run directory %q must not contain spaces or quotes (it goes on the kernel command line)", dir)
	}
	var sh strings.Builder
	fmt.Fprintf(&sh, "cd %s || { echo 'vmtest: cannot cd to the working directory'; exit 125; }\n", shellQuote(opts.Dir))
	env := map[string]string{"PATH": defaultPath, "HOME": "/tmp", InVMEnv: "1"}
	for key, v := range opts.Env {
		if !envKeyRE.MatchString(key) {
			return "", "", fmt.Errorf("vmtest: bad environment variable name %q", key)
		}
		env[key] = v
	}
	keys := make([]string, 0, len(env))
	for key := range env {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	for _, key := range keys {
		fmt.Fprintf(&sh, "export %s=%s\n", key, shellQuote(env[key]))
	}
	sh.WriteString("exec")
	for _, a := range argv {
		sh.WriteString(" " + shellQuote(a))
	}
	sh.WriteString("\n")
	net := 0
	if opts.HostPort != 0 {
		net = 1
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	files := map[string]string{
		"cmd.sh": sh.String(),
		"conf":   fmt.Sprintf("NONCE=%s\nNET=%d\nKEEP=%s\n", nonce, net, keepUnderTmp()),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			os.RemoveAll(dir)
			return "", "", err
		}
	}
	return dir, nonce, nil
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// console follows the serial console. Markers carry the run's nonce, so
// output of the command cannot fake them.
type console struct {
	nonce string
	live  io.Writer
	start time.Time

	lines       []string // last lines, for error reports
	started     bool
	exited      bool
	exitCode    int
	bootTime    time.Duration
	bootFailure string
	output      strings.Builder
}

const tailLines = 40

// BootTimeout bounds the time from starting qemu to starting the command.
// A boot takes 3 s on an idle 2-core host and up to ~25 s on a busy one.
var BootTimeout = 3 * time.Minute

func (c *console) read(r io.Reader, onStart, onExit func()) {
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			c.line(strings.TrimRight(line, "\r\n"), onStart, onExit)
		}
		if err != nil {
			return
		}
	}
}

func (c *console) line(l string, onStart, onExit func()) {
	l = strings.ReplaceAll(l, "\r", "")
	if c.live != nil {
		fmt.Fprintln(c.live, l)
	}
	c.lines = append(c.lines, l)
	if len(c.lines) > tailLines {
		c.lines = c.lines[1:]
	}
	switch {
	case c.exited:
	case !c.started:
		if strings.HasSuffix(l, "VMTEST-START "+c.nonce) {
			c.started = true
			c.bootTime = time.Since(c.start)
			onStart()
		} else if i := strings.Index(l, "VMTEST-BOOT-FAILED: "); i >= 0 {
			c.bootFailure = l[i+len("VMTEST-BOOT-FAILED: "):]
		}
	default:
		// The marker may follow output that did not end in a newline.
		i := strings.LastIndex(l, "VMTEST-EXIT=")
		if i >= 0 && strings.HasSuffix(l, " "+c.nonce) {
			code, err := strconv.Atoi(strings.TrimSuffix(l[i+len("VMTEST-EXIT="):], " "+c.nonce))
			if err == nil {
				c.output.WriteString(l[:i])
				c.exited, c.exitCode = true, code
				onExit()
				return
			}
		}
		c.output.WriteString(l + "\n")
	}
}

func (c *console) tail() string {
	return strings.Join(c.lines, "\n")
}

// keepUnderTmp is the repo root when it lives under /tmp (a CI clone may):
// the VM mounts a fresh /tmp, so init.sh binds the host's copy of that one
// directory back, read-only like the rest of the host root.
func keepUnderTmp() string {
	root, err := RepoRoot()
	if err != nil || !strings.HasPrefix(root, "/tmp/") || strings.ContainsAny(root, " \t\n'\"$`\\") {
		return ""
	}
	return root
}
