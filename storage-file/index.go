package filestore

import (
	"github.com/kiteq/kiteq/storage-file/internal/btree"
)

// pos is where a record lies: segment, offset and length (header included).
type pos struct {
	seg  uint32
	off  uint32
	size uint32
}

// entry is what the index keeps of a message: where its records are and
// the state that orders it. The message itself stays on disk.
type entry struct {
	save     pos   // its latest recSave
	delivery pos   // its latest recDelivery after save; size 0 when none
	next     int64 // NextDeliverTime, unix ms
	count    int32
	state    state
}

// dueKey orders messages by (NextDeliverTime, id).
type dueKey struct {
	next int64
	id   msgID
}

func dueLess(a, b dueKey) bool {
	if a.next != b.next {
		return a.next < b.next
	}
	return string(a.id[:]) < string(b.id[:])
}

func idLess(a, b msgID) bool { return string(a[:]) < string(b[:]) }

type deadInfo struct {
	reason string
	at     int64
}

// segStats counts what a segment holds for the space policy.
type segStats struct {
	size      int64 // bytes written
	live      int   // messages whose recSave is in this segment
	liveBytes int64 // bytes of those recSave records
}

// index is the in-memory view of the log: rebuilt by applying every record
// in log order at open, and kept by applying every record written since.
type index struct {
	entries map[msgID]entry
	due     [2]*btree.Set[dueKey] // [0] committed, for delivery; [1] uncommitted, for a check
	deadIDs *btree.Set[msgID]
	dead    map[msgID]deadInfo
	segs    map[uint32]*segStats
	live    int // entries that are not dead
}

func newIndex() *index {
	return &index{
		entries: make(map[msgID]entry),
		due:     [2]*btree.Set[dueKey]{btree.New(dueLess), btree.New(dueLess)},
		deadIDs: btree.New(idLess),
		dead:    make(map[msgID]deadInfo),
		segs:    make(map[uint32]*segStats),
	}
}

func dueTree(st state) int {
	if st.committed() {
		return 0
	}
	return 1
}

func (x *index) seg(id uint32) *segStats {
	s := x.segs[id]
	if s == nil {
		s = &segStats{}
		x.segs[id] = s
	}
	return s
}

// remove forgets e (of id) entirely.
func (x *index) remove(id msgID, e entry) {
	delete(x.entries, id)
	if s := x.segs[e.save.seg]; s != nil {
		s.live--
		s.liveBytes -= int64(e.save.size)
	}
	if e.state.dead() {
		x.deadIDs.Delete(id)
		delete(x.dead, id)
	} else {
		x.due[dueTree(e.state)].Delete(dueKey{e.next, id})
		x.live--
	}
}

// insert adds e, which must not be present.
func (x *index) insert(id msgID, e entry) {
	x.entries[id] = e
	s := x.seg(e.save.seg)
	s.live++
	s.liveBytes += int64(e.save.size)
	if e.state.dead() {
		x.deadIDs.Insert(id)
	} else {
		x.due[dueTree(e.state)].Insert(dueKey{e.next, id})
		x.live++
	}
}

// apply changes the index by the record r written at p. Records about an
// id the index does not hold are ignored: their message was finished, or
// its recSave was rewritten further on by compaction, which carries the
// whole state.
func (x *index) apply(r *record, p pos) {
	e, ok := x.entries[r.id]
	switch r.kind {
	case recSave:
		if ok {
			x.remove(r.id, e)
		}
		ne := entry{save: p, next: r.next, count: r.count, state: r.state}
		x.insert(r.id, ne)
		if r.state.dead() {
			x.dead[r.id] = deadInfo{reason: r.reason, at: r.at}
		}
	case recCommit:
		if ok && !e.state.committed() && !e.state.dead() {
			x.remove(r.id, e)
			e.state, e.next = e.state|flagCommitted, r.next
			e.count = 0 // the transaction checks were not deliveries
			x.insert(r.id, e)
		}
	case recRollback:
		if ok && !e.state.committed() && !e.state.dead() {
			x.remove(r.id, e)
		}
	case recDelivery:
		if ok && !e.state.dead() {
			x.due[dueTree(e.state)].Delete(dueKey{e.next, r.id})
			e.count, e.next, e.delivery = r.count, r.next, p
			x.due[dueTree(e.state)].Insert(dueKey{e.next, r.id})
			x.entries[r.id] = e
		}
	case recDelete:
		if ok && !e.state.dead() {
			x.remove(r.id, e)
		}
	case recRedeliver:
		if ok && e.state.dead() {
			x.remove(r.id, e)
			e.state = e.state&^flagDead | flagCommitted
			e.count, e.next, e.delivery = r.count, r.next, p
			x.insert(r.id, e)
		}
	case recDead:
		if ok && !e.state.dead() {
			x.remove(r.id, e)
			e.state |= flagDead
			x.insert(r.id, e)
			x.dead[r.id] = deadInfo{reason: r.reason, at: r.at}
		}
	}
}
