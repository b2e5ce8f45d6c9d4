package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// iptables-restore commits each table at its COMMIT line, so one restore
// call is one transaction per table, not per family. A partial plan
// therefore runs as up to three steps per family, ordered so that every
// intermediate state is safe: filter rows only ever match traffic that nat
// did not DNAT, so extra filter rows are harmless while missing ones are
// not.
//
//  1. filter additions (REJECT/DROP rows for services that lost endpoints)
//  2. nat, whole
//  3. filter deletions (rows of services that gained endpoints)
//
// A full plan rewrites each of our chains whole in its commit, so it runs
// as one call (both tables), saving a ruleset load (one per call with
// iptables-nft). If a step is refused, the steps already taken are undone,
// newest first, with the matching steps of the reverse plan (next to prev).
type stepKind int

const (
	filterAdds stepKind = iota
	natAll
	filterDels
	everything
)

func (fp *FamilyPlan) steps() []stepKind {
	if fp.Full {
		return []stepKind{everything}
	}
	return []stepKind{filterAdds, natAll, filterDels}
}

// undoKind is the step of the reverse plan that undoes k.
func undoKind(k stepKind) stepKind {
	switch k {
	case filterAdds:
		return filterDels
	case filterDels:
		return filterAdds
	}
	return k
}

// fixedNat are the nat chains a full plan declares before any service.
// SBX-SERVICES and SBX-NODEPORTS come first and reference service chains.
const fixedNat = 5

// chunkLines bounds a commit of a chunked full nat plan. iptables-nft's
// restore (1.8.9) spends user time quadratic in the size of one
// transaction, while the kernel revalidates every chain reachable from a
// built-in chain at each commit. For 10,000 services × 10 endpoints with
// the jumps in place: one commit 11.0 s; commits of 3,000 rules 3.9 s,
// 6,000 rules 3.4 s, 12,000 rules 3.9 s. All commits go in one call (each
// call pays ~130 ms to load the ruleset). iptables-legacy replaces the
// whole table at every commit, so it always gets one.
const chunkLines = 6000

// natInput returns the nat table's part of the plan. With nft, a full plan
// commits the fixed chains first, then service chains in batches (each
// rewritten whole in one commit), then the dispatch chains and stale-chain
// deletions, which reference everything before.
func (fp *FamilyPlan) natInput(nft bool) []byte {
	nat := &fp.nat
	if !nft || !fp.Full || len(nat.marks) == 0 || len(nat.decl) < fixedNat {
		var b bytes.Buffer
		b.Grow(len(nat.body) + len(nat.rows) + 40*len(nat.decl) + 4096)
		nat.writeTo(&b, "nat")
		return b.Bytes()
	}
	var b bytes.Buffer
	b.Grow(len(nat.body) + len(nat.rows) + 40*len(nat.decl) + 4096)
	commit := func() { b.WriteString("COMMIT\n") }
	b.WriteString("*nat\n")
	for _, c := range nat.decl[2:fixedNat] {
		b.WriteString(":" + c + " - [0:0]\n")
	}
	b.Write(nat.head)
	commit()
	prev := boundary{fixedNat, 0}
	for i, m := range nat.marks {
		last := i == len(nat.marks)-1
		if !last && bytes.Count(nat.body[prev.body:m.body], []byte("\n")) < chunkLines {
			continue
		}
		b.WriteString("*nat\n")
		for _, c := range nat.decl[prev.decl:m.decl] {
			b.WriteString(":" + c + " - [0:0]\n")
		}
		b.Write(nat.body[prev.body:m.body])
		commit()
		prev = m
	}
	rest := section{
		decl: append(slices.Clone(nat.decl[:2]), nat.decl[prev.decl:]...),
		rows: nat.rows, tail: nat.tail, body: nat.body[prev.body:], jumps: nat.jumps, drop: nat.drop,
	}
	rest.writeTo(&b, "nat")
	return b.Bytes()
}

func (fp *FamilyPlan) input(k stepKind, nft bool) []byte {
	var b bytes.Buffer
	switch k {
	case filterAdds:
		s := fp.filter
		s.del = nil
		s.writeTo(&b, "filter")
	case natAll:
		return fp.natInput(nft)
	case filterDels:
		s := section{del: fp.filter.del}
		s.writeTo(&b, "filter")
	case everything:
		fp.filter.writeTo(&b, "filter")
		b.Write(fp.natInput(nft))
	}
	return b.Bytes()
}

// heldBy reports whether the kernel, as saved, already holds exactly the
// chains of this full plan, so that Sync can skip the restore: an agent
// restart over unchanged rules, or a repair after someone removed only a
// jump. Our rules are rendered as iptables-save prints them, so equal
// means textually equal.
func (fp *FamilyPlan) heldBy(saved map[string]*savedTable) bool {
	if !fp.Full || len(fp.nat.drop) > 0 || len(fp.filter.drop) > 0 {
		return false
	}
	want := parseSave(fp.input(everything, false))
	for _, table := range []string{"filter", "nat"} {
		if saved[table] == nil || want[table] == nil {
			return false
		}
		// Extra SBX chains in the kernel are either stale service chains,
		// which the plan deletes (so it is not held), or not ours to judge.
		got, w := ownChains(saved[table]), ownChains(want[table])
		for chain, wr := range w {
			gr, ok := got[chain]
			if !ok || len(gr) != len(wr) {
				return false
			}
			if isDispatch(table, chain) {
				// Rows in any order, but the tail below them, in order.
				if table == "nat" && chain == chainServices {
					k := bytes.Count(fp.nat.tail, []byte("\n"))
					if !slices.Equal(gr[len(gr)-k:], wr[len(wr)-k:]) {
						return false
					}
				}
				gr, wr = slices.Sorted(slices.Values(gr)), slices.Sorted(slices.Values(wr))
			}
			if !slices.Equal(gr, wr) {
				return false
			}
		}
	}
	return true
}

// ownChains groups the rules of a table's SBX chains by chain, empty
// chains included.
func ownChains(t *savedTable) map[string][]string {
	out := map[string][]string{}
	for _, c := range t.chains {
		if strings.HasPrefix(c, "SBX-") {
			out[c] = []string{}
		}
	}
	for _, r := range t.rules {
		c := ruleChain(r)
		if rules, ok := out[c]; ok {
			out[c] = append(rules, r)
		}
	}
	return out
}

type step struct {
	fam  family
	kind stepKind
}

// runPlan applies a plan step by step. undo, when not nil, renders the
// reverse plan used to take back applied steps on a refusal.
func (p *Plane) runPlan(ctx context.Context, plan *Plan, undo func() (Plan, error)) error {
	nft := p.backend == BackendNFT
	var done []step
	for _, fam := range p.fams {
		fp := plan.family(fam)
		if fp == nil {
			continue
		}
		for _, k := range fp.steps() {
			input := fp.input(k, nft)
			if len(input) == 0 {
				continue
			}
			if k == everything {
				// Several commits: the undo must also cover those that went
				// in before a refusal (a full input is idempotent).
				done = append(done, step{fam, k})
			}
			p.restores++
			if err := restore(ctx, commandsFor(p.backend, fam), p.cfg.WaitSeconds, input); err != nil {
				err = fmt.Errorf("iptables: %s: %w", fam, err)
				if undo != nil && len(done) > 0 {
					if uerr := p.undo(ctx, done, undo); uerr != nil {
						err = errors.Join(err, uerr)
					}
				}
				return err
			}
			if k != everything {
				done = append(done, step{fam, k})
			}
		}
	}
	return nil
}

func (p *Plane) undo(ctx context.Context, done []step, render func() (Plan, error)) error {
	back, err := render()
	if err != nil {
		return fmt.Errorf("iptables: render undo: %w", err)
	}
	for i := len(done) - 1; i >= 0; i-- {
		s := done[i]
		input := back.family(s.fam).input(undoKind(s.kind), p.backend == BackendNFT)
		if len(input) == 0 {
			continue
		}
		if err := restore(ctx, commandsFor(p.backend, s.fam), p.cfg.WaitSeconds, input); err != nil {
			// Past repair here; the agent's periodic Sync converges it.
			return fmt.Errorf("iptables: undo %s: %w", s.fam, err)
		}
	}
	return nil
}
