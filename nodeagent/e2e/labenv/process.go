package labenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/signalbox/signalbox/tools/netlab"
)

// Process is one binary (control plane or agent) running inside a lab
// namespace, with its output appended to a log file. It can be killed and
// started again with the same command line, which the fail-static tests do.
type Process struct {
	Name    string
	Host    *netlab.Host
	Argv    []string // binary and flags
	LogPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has been reaped
	err  error         // cmd.Wait's result, valid after done
}

// forker starts every child from one goroutine locked to one OS thread for
// the process's lifetime. Pdeathsig fires when the forking thread exits, not
// the process, and Go ends a thread whenever a goroutine exits while locked
// to it (netlab's namespace switching can do that), which would kill an
// agent in the middle of a test.
var forker = sync.OnceValue(func() chan func() {
	reqs := make(chan func())
	go func() {
		runtime.LockOSThread()
		for f := range reqs {
			f()
		}
	}()
	return reqs
})

func onForker(f func()) {
	done := make(chan struct{})
	forker() <- func() { f(); close(done) }
	<-done
}

// Start runs the process. It fails if the process already runs.
func (p *Process) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && !p.exitedLocked() {
		return fmt.Errorf("%s already runs (pid %d)", p.Name, p.cmd.Process.Pid)
	}
	if err := os.MkdirAll(filepath.Dir(p.LogPath), 0o755); err != nil {
		return err
	}
	logFile, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child holds its own descriptor
	fmt.Fprintf(logFile, "### %s: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(p.Argv, " "))

	// `ip netns exec` execs the binary in place, so the pid we hold is the
	// binary's and signals reach it directly.
	// Background: the process outlives the call; Stop and Kill end it by pid.
	cmd := p.Host.Command(context.Background(), p.Argv[0], p.Argv[1:]...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Own process group: a terminal's Ctrl-C reaches the test or demo,
	// which then stops its children in order (or Pdeathsig does).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	onForker(func() { err = cmd.Start() })
	if err != nil {
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.err = cmd, done, nil
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		if p.cmd == cmd {
			p.err = err
		}
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

func (p *Process) exitedLocked() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// PID returns the running process's id, or 0.
func (p *Process) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.exitedLocked() {
		return 0
	}
	return p.cmd.Process.Pid
}

// Exited reports whether the process was started and has ended, and how.
func (p *Process) Exited() (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || !p.exitedLocked() {
		return false, nil
	}
	return true, p.err
}

// Kill sends SIGKILL, as a crash or an OOM kill would, and waits until the
// process is reaped.
func (p *Process) Kill() error { return p.stop(syscall.SIGKILL, 0) }

// Stop asks the process to end (SIGTERM), kills it after timeout, and
// waits until it is reaped. Stopping a process that does not run is a no-op.
func (p *Process) Stop(timeout time.Duration) error { return p.stop(syscall.SIGTERM, timeout) }

func (p *Process) stop(sig syscall.Signal, timeout time.Duration) error {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	default:
	}
	// Only ever the pid we started, and only while it is unreaped: a
	// reaped pid may already belong to someone else.
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s: %w", p.Name, err)
	}
	if sig != syscall.SIGKILL {
		select {
		case <-done:
			return nil
		case <-time.After(timeout):
		}
		if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("kill %s: %w", p.Name, err)
		}
	}
	<-done
	return nil
}

// Tail returns the last n lines of the process's log.
func (p *Process) Tail(n int) string {
	data, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
