package devcluster

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is one child process (etcd or kube-apiserver) started by Start.
type proc struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has been reaped
	waitErr error         // valid after done is closed
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// spawner starts children from one goroutine locked to its OS thread for
// the cluster's lifetime. Pdeathsig fires when the thread that forked the
// child exits, not the process; Go ends a thread whenever a goroutine exits
// while locked to it (netns code does that on purpose), so forking from an
// ordinary goroutine could kill etcd in the middle of a test.
type spawner struct {
	reqs chan func()
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan func())}
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for f := range s.reqs {
			f()
		}
	}()
	return s
}

func (s *spawner) do(f func()) {
	done := make(chan struct{})
	s.reqs <- func() { f(); close(done) }
	<-done
}

func (s *spawner) close() { close(s.reqs) }

// startProc starts argv with output appended to logPath. Detached children
// get their own session and outlive us; attached ones get their own process
// group (a terminal's Ctrl-C goes to the test binary, which then takes them
// down via Pdeathsig or Stop) and SIGKILL when the forking thread dies.
func startProc(s *spawner, name string, argv []string, logPath string, detach bool) (*proc, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child holds its own copy
	fmt.Fprintf(logFile, "### %s: %s\n", time.Now().Format(time.RFC3339), strings.Join(argv, " "))

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if detach {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	} else {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	}
	p := &proc{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	s.do(func() { err = cmd.Start() })
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// stop sends SIGTERM, then SIGKILL after timeout, and waits for the child
// to be reaped so that no process is left when it returns.
func (p *proc) stop(timeout time.Duration) {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(timeout):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// The pids file records who owns a state dir and which processes run from
// it, so that a later Start or `devcluster down` can clean up after a
// killed test binary or a crashed CLI:
//
//	owner <pid> <starttime>   (owner 0 0 for a detached cluster)
//	etcd <pid>
//	kube-apiserver <pid>
const pidsFile = "pids"

type pidRecord struct {
	ownerPID   int
	ownerStart string
	procs      []namedPID
}

type namedPID struct {
	name string
	pid  int
}

func writePIDs(dir string, rec pidRecord) error {
	var b bytes.Buffer
	start := rec.ownerStart
	if start == "" {
		start = "0"
	}
	fmt.Fprintf(&b, "owner %d %s\n", rec.ownerPID, start)
	for _, p := range rec.procs {
		fmt.Fprintf(&b, "%s %d\n", p.name, p.pid)
	}
	tmp := filepath.Join(dir, pidsFile+".tmp")
	if err := os.WriteFile(tmp, b.Bytes(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, pidsFile))
}

func readPIDs(dir string) (pidRecord, error) {
	var rec pidRecord
	f, err := os.Open(filepath.Join(dir, pidsFile))
	if err != nil {
		return rec, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 2 {
			continue
		}
		pid, err := strconv.Atoi(fields[1])
		if err != nil {
			return rec, fmt.Errorf("%s: bad line %q", f.Name(), s.Text())
		}
		if fields[0] == "owner" {
			rec.ownerPID = pid
			if len(fields) > 2 {
				rec.ownerStart = fields[2]
			}
			continue
		}
		rec.procs = append(rec.procs, namedPID{fields[0], pid})
	}
	return rec, s.Err()
}

// procStartTime returns field 22 of /proc/PID/stat (start time in clock
// ticks since boot); with the PID it identifies a process across PID reuse.
func procStartTime(pid int) (string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// The command name (field 2) may contain spaces; fields after the last
	// ')' are space-separated, starting with field 3 (state).
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return "", fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	fields := strings.Fields(string(data[i+1:]))
	if len(fields) < 20 {
		return "", fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	if fields[0] == "Z" {
		return "", fmt.Errorf("process %d is a zombie", pid)
	}
	return fields[19], nil
}

// ownerAlive reports whether the process that wrote rec still runs.
func ownerAlive(rec pidRecord) bool {
	if rec.ownerPID <= 0 {
		return false
	}
	st, err := procStartTime(rec.ownerPID)
	return err == nil && st == rec.ownerStart
}

// isOurs reports whether pid is alive and is a process started from dir:
// its command line names the binary and a path inside dir. A reused PID
// never matches, so we never signal a stranger.
func isOurs(pid int, name, dir string) bool {
	if pid <= 0 {
		return false
	}
	if _, err := procStartTime(pid); err != nil { // gone or zombie
		return false
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(raw) == 0 {
		return false
	}
	args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
	binOK, dirOK := false, false
	for _, a := range args {
		if filepath.Base(a) == name {
			binOK = true
		}
		if strings.Contains(a, dir+string(filepath.Separator)) {
			dirOK = true
		}
	}
	return binOK && dirOK
}

// RunningPIDs returns the live processes recorded in dir's pids file that
// still belong to it, by name.
func RunningPIDs(dir string) (map[string]int, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	rec, err := readPIDs(dir)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]int{}, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for _, p := range rec.procs {
		if isOurs(p.pid, p.name, dir) {
			out[p.name] = p.pid
		}
	}
	return out, nil
}

// StopDir stops the processes recorded in dir's pids file (a cluster left
// by a killed test, or one started detached by `devcluster up`): SIGTERM,
// then SIGKILL after a timeout. Each PID is checked against its command
// line before every signal. It returns once none of them is alive.
func StopDir(dir string, log io.Writer) error {
	if log == nil {
		log = io.Discard
	}
	running, err := RunningPIDs(dir)
	if err != nil {
		return err
	}
	// kube-apiserver first: stopping etcd under it only produces noise.
	for _, name := range []string{string(APIServer), string(Etcd)} {
		pid, ok := running[name]
		if !ok {
			continue
		}
		fmt.Fprintf(log, "stopping %s (pid %d) of %s\n", name, pid, dir)
		if err := killAndWait(pid, name, dir, 15*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// killAndWait stops a process that is not our child, so it can only poll
// /proc for it to disappear (or turn into a zombie its parent must reap).
func killAndWait(pid int, name, dir string, timeout time.Duration) error {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		if !isOurs(pid, name, dir) {
			return nil
		}
		if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("signal %s (pid %d): %w", name, pid, err)
		}
		deadline := time.Now().Add(timeout)
		for time.Now().Before(deadline) {
			if !isOurs(pid, name, dir) {
				return nil
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return fmt.Errorf("%s (pid %d) survived SIGKILL", name, pid)
}

// tail returns the last n lines of a log file, for error messages.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
