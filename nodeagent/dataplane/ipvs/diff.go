package ipvs

import (
	"cmp"
	"net/netip"
	"slices"
)

// VSOp adds or updates one virtual server (its Reals are not used).
type VSOp struct {
	Key VSKey
	VS  *VirtualServer
}

// RSOp adds, updates or deletes one real server.
type RSOp struct {
	VS     VSKey
	RS     RSKey
	Weight int
}

// SetMember is one ipset entry.
type SetMember struct {
	Set, Member string
}

// Ops are the kernel operations that move one State to another. Real
// servers of added or deleted virtual servers are listed only when the
// virtual server is added: deleting a virtual server deletes its real
// servers.
type Ops struct {
	AddServices, UpdateServices []VSOp
	DelServices                 []VSKey
	AddReals, UpdateReals       []RSOp
	DelReals                    []RSOp
	AddAddrs, DelAddrs          []netip.Addr
	SetAdds, SetDels            []SetMember
	// Rules holds the families whose rule set changed.
	Rules map[Family]Rules
}

// Empty is true when there is nothing to do.
func (o Ops) Empty() bool {
	return len(o.AddServices)+len(o.UpdateServices)+len(o.DelServices)+
		len(o.AddReals)+len(o.UpdateReals)+len(o.DelReals)+
		len(o.AddAddrs)+len(o.DelAddrs)+len(o.SetAdds)+len(o.SetDels)+len(o.Rules) == 0
}

// Diff returns the minimal operations from prev to next. Its output is
// sorted, so equal inputs give equal plans.
func Diff(prev, next State) Ops {
	var o Ops
	for k, nv := range next.Services {
		pv, ok := prev.Services[k]
		switch {
		case !ok:
			o.AddServices = append(o.AddServices, VSOp{k, nv})
			for rs, w := range nv.Reals {
				o.AddReals = append(o.AddReals, RSOp{k, rs, w})
			}
			continue
		case !pv.sameService(nv):
			o.UpdateServices = append(o.UpdateServices, VSOp{k, nv})
		}
		for rs, w := range nv.Reals {
			if pw, ok := pv.Reals[rs]; !ok {
				o.AddReals = append(o.AddReals, RSOp{k, rs, w})
			} else if pw != w {
				o.UpdateReals = append(o.UpdateReals, RSOp{k, rs, w})
			}
		}
		for rs, w := range pv.Reals {
			if _, ok := nv.Reals[rs]; !ok {
				o.DelReals = append(o.DelReals, RSOp{k, rs, w})
			}
		}
	}
	for k := range prev.Services {
		if _, ok := next.Services[k]; !ok {
			o.DelServices = append(o.DelServices, k)
		}
	}
	for a := range next.Addrs {
		if _, ok := prev.Addrs[a]; !ok {
			o.AddAddrs = append(o.AddAddrs, a)
		}
	}
	for a := range prev.Addrs {
		if _, ok := next.Addrs[a]; !ok {
			o.DelAddrs = append(o.DelAddrs, a)
		}
	}
	// Only sets the next state names: a set it does not name belongs to a
	// family the plane does not program.
	for name, members := range next.Sets {
		old := prev.Sets[name]
		for m := range members {
			if _, ok := old[m]; !ok {
				o.SetAdds = append(o.SetAdds, SetMember{name, m})
			}
		}
		for m := range old {
			if _, ok := members[m]; !ok {
				o.SetDels = append(o.SetDels, SetMember{name, m})
			}
		}
	}
	for f, r := range next.Rules {
		if pr, ok := prev.Rules[f]; !ok || !pr.equal(r) {
			if o.Rules == nil {
				o.Rules = map[Family]Rules{}
			}
			o.Rules[f] = r
		}
	}
	o.sort()
	return o
}

func compareVS(a, b VSKey) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Port, b.Port))
}

func compareRS(a, b RSOp) int {
	return cmp.Or(compareVS(a.VS, b.VS), a.RS.Addr.Compare(b.RS.Addr), cmp.Compare(a.RS.Port, b.RS.Port))
}

func compareMember(a, b SetMember) int {
	return cmp.Or(cmp.Compare(a.Set, b.Set), cmp.Compare(a.Member, b.Member))
}

func (o *Ops) sort() {
	byKey := func(a, b VSOp) int { return compareVS(a.Key, b.Key) }
	slices.SortFunc(o.AddServices, byKey)
	slices.SortFunc(o.UpdateServices, byKey)
	slices.SortFunc(o.DelServices, compareVS)
	slices.SortFunc(o.AddReals, compareRS)
	slices.SortFunc(o.UpdateReals, compareRS)
	slices.SortFunc(o.DelReals, compareRS)
	slices.SortFunc(o.AddAddrs, netip.Addr.Compare)
	slices.SortFunc(o.DelAddrs, netip.Addr.Compare)
	slices.SortFunc(o.SetAdds, compareMember)
	slices.SortFunc(o.SetDels, compareMember)
}
