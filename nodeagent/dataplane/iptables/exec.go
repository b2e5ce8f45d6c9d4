package iptables

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Backends, as reported by Plane.Name.
const (
	BackendLegacy = "iptables-legacy"
	BackendNFT    = "iptables-nft"
)

// commands are the binaries of one backend and family.
type commands struct {
	restore, save, iptables string
}

func commandsFor(backend string, fam family) commands {
	mode := "legacy"
	if backend == BackendNFT {
		mode = "nft"
	}
	p := "iptables"
	if fam == v6 {
		p = "ip6tables"
	}
	return commands{restore: p + "-" + mode + "-restore", save: p + "-" + mode + "-save", iptables: p + "-" + mode}
}

// run executes a command in the caller's network namespace (a child
// inherits the namespace of the OS thread that forks it).
func run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("%s is not installed: %w", name, err)
		}
		return stdout.Bytes(), fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

var restoreErrLine = regexp.MustCompile(`(?:Error occurred at line: |line )(\d+)`)

// restore runs one iptables-restore transaction. --noflush leaves every
// chain the input does not declare alone; the kernel takes the whole
// input or none of it.
func restore(ctx context.Context, cmds commands, wait int, input []byte) error {
	_, err := run(ctx, input, cmds.restore, "--noflush", "-w", strconv.Itoa(wait))
	if err == nil {
		return nil
	}
	return restoreError(err, input)
}

// restoreError points at the offending input line: the error goes back to
// the control plane in the NACK, where nobody can rerun the command.
func restoreError(err error, input []byte) error {
	if m := restoreErrLine.FindStringSubmatch(err.Error()); m != nil {
		n, _ := strconv.Atoi(m[1])
		if lines := bytes.Split(input, []byte("\n")); n >= 1 && n <= len(lines) {
			return fmt.Errorf("%w (input line %d: %s)", err, n, lines[n-1])
		}
	}
	return err
}

// savedTable is one table of iptables-save output.
type savedTable struct {
	chains  []string
	builtin map[string]bool
	rules   []string // "-A CHAIN ..." lines
}

func parseSave(out []byte) map[string]*savedTable {
	tables := map[string]*savedTable{}
	var cur *savedTable
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "*"):
			cur = &savedTable{builtin: map[string]bool{}}
			tables[line[1:]] = cur
		case cur == nil:
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			if len(f) == 0 {
				continue
			}
			cur.chains = append(cur.chains, f[0])
			if len(f) > 1 && f[1] != "-" {
				cur.builtin[f[0]] = true
			}
		case strings.HasPrefix(line, "-A "):
			cur.rules = append(cur.rules, line)
		}
	}
	return tables
}

// ruleChain returns the chain of a saved "-A CHAIN ..." line.
func ruleChain(line string) string {
	f := strings.SplitN(line, " ", 3)
	if len(f) < 2 {
		return ""
	}
	return f[1]
}

// tokens splits a saved rule into arguments, as a shell would split it:
// double quotes group (our comments never hold quotes or backslashes).
func tokens(line string) []string {
	var toks []string
	var cur strings.Builder
	inQuote, inTok := false, false
	for _, c := range line {
		switch {
		case c == '"':
			inQuote, inTok = !inQuote, true
		case c == ' ' && !inQuote:
			if inTok {
				toks = append(toks, cur.String())
				cur.Reset()
				inTok = false
			}
		default:
			cur.WriteRune(c)
			inTok = true
		}
	}
	if inTok {
		toks = append(toks, cur.String())
	}
	return toks
}

// ruleTarget returns the -j/-g target of a saved rule.
func ruleTarget(line string) string {
	toks := tokens(line)
	for i := 0; i+1 < len(toks); i++ {
		if toks[i] == "-j" || toks[i] == "-g" {
			return toks[i+1]
		}
	}
	return ""
}

// DetectBackend picks the backend the node's other components already
// use, as kube-proxy's images do: a kubelet hint chain first, then
// whichever backend holds more rules, then the node's default alternative.
func DetectBackend(ctx context.Context) (string, error) {
	type tally struct {
		rules int
		hint  bool
	}
	count := func(mode string) tally {
		var t tally
		for _, p := range []string{"iptables", "ip6tables"} {
			// Old iptables-nft versions could hang here; never wait forever.
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			out, err := run(cctx, nil, p+"-"+mode+"-save")
			cancel()
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(line, "-A ") {
					t.rules++
				}
				if strings.HasPrefix(line, ":KUBE-IPTABLES-HINT ") || strings.HasPrefix(line, ":KUBE-KUBELET-CANARY ") {
					t.hint = true
				}
			}
		}
		return t
	}
	legacy, nft := count("legacy"), count("nft")
	switch {
	case legacy.hint && !nft.hint:
		return BackendLegacy, nil
	case nft.hint && !legacy.hint:
		return BackendNFT, nil
	case legacy.rules > nft.rules:
		return BackendLegacy, nil
	case nft.rules > legacy.rules:
		return BackendNFT, nil
	}
	out, err := run(ctx, nil, "iptables", "--version")
	if err != nil {
		return "", fmt.Errorf("iptables: detect backend: %w", err)
	}
	if strings.Contains(string(out), "nf_tables") {
		return BackendNFT, nil
	}
	return BackendLegacy, nil
}
