//! Linearizability of a register history, per key: the Wing-Gong search as Lowe improved it
//! ("Testing for linearizability", 2017), under a time budget.
//!
//! The calls and returns of the operations form a doubly linked list in time order. The search
//! linearizes (lifts out of the list) any operation whose call comes before the first return still
//! in the list and whose result the register allows, and backtracks when none fits. A
//! configuration, the set of operations linearized so far plus the register's value, is explored
//! at most once.
//!
//! Operations whose outcome is unknown would multiply the configurations, since each may or may
//! not have happened. Three reductions keep that in check without losing a linearization: values
//! that nobody reads or compares against count as one value; unknown operations with the same
//! effect are used in call order only; and an unknown operation is linearized only right before
//! an operation whose result it changes (otherwise it can be dropped or moved later).
//!
//! Operations that completed `ok` must all be linearized, each between its call and its return.
//! Operations whose outcome is unknown (`info`) may be linearized anywhere after their call, or
//! never. Operations that certainly failed are ignored, and so are reads whose outcome is unknown.
//! A return and a call at the same instant count as concurrent.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
    time::{Duration, Instant},
};

use crate::history::{Kind, KvOp, Operation};

/// The outcome of checking one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of the operations explains the results; the explanation shows where the search
    /// got furthest.
    NotLinearizable {
        explanation: String,
    },
    /// The budget ran out (or the search outgrew its memory bound) before it could decide.
    Unknown {
        reason: String,
    },
}

/// The check of one key.
#[derive(Clone, Debug)]
pub struct KeyReport {
    pub key: String,
    /// Operations searched: the key's operations less failed ones and reads of unknown outcome.
    pub ops: usize,
    pub verdict: Verdict,
    pub elapsed: Duration,
}

/// Checks one key's operations (all of `ops` are on `key`) within `budget`.
pub fn check_key(key: &str, ops: &[Operation], budget: Duration) -> KeyReport {
    let refs: Vec<&Operation> = ops.iter().collect();
    check(key, &refs, budget)
}

/// Splits the operations by key and checks each key on its own, with `budget` for each: a
/// register per key is linearizable exactly when every key's history is. Reports are in key order.
pub fn check_all(ops: &[Operation], budget: Duration) -> Vec<KeyReport> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in ops {
        by_key.entry(o.key.as_str()).or_default().push(o);
    }
    by_key.into_iter().map(|(key, ops)| check(key, &ops, budget)).collect()
}

fn check(key: &str, ops: &[&Operation], budget: Duration) -> KeyReport {
    let started = Instant::now();
    let history = History::new(ops);
    let verdict = history.search(started, budget);
    KeyReport { key: key.to_string(), ops: history.req.len() + history.opt.len(), verdict, elapsed: started.elapsed() }
}

/// A register value as the search sees it: `ABSENT`, `UNSEEN` for every value that no read
/// returns and no compare-and-swap compares against (the register cannot tell such values apart,
/// so configurations that differ only in which of them is stored are one), or a number from 2 up
/// for each value that is read or compared against.
type Val = u64;
const ABSENT: Val = 0;
const UNSEEN: Val = 1;

/// A register operation with its values as `Val`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum F {
    Read(Val),
    Write(Val),
    /// `ok` is whether it swapped, None when that is unknown.
    Cas {
        from: Val,
        to: Val,
        ok: Option<bool>,
    },
}

/// The register's value after `f` if `f` can take effect on `state` with its recorded result.
fn step(state: Val, f: F) -> Option<Val> {
    match f {
        F::Read(v) => (state == v).then_some(state),
        F::Write(v) => Some(v),
        F::Cas { from, to, ok } => {
            let swaps = state == from;
            match ok {
                Some(ok) if ok != swaps => None,
                _ => Some(if swaps { to } else { state }),
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Op {
    call: u64,
    /// u64::MAX for an operation whose outcome is unknown.
    ret: u64,
    f: F,
    /// Index into the operations checked.
    src: usize,
}

/// One key's operations, ready for the search.
struct History<'a> {
    src: &'a [&'a Operation],
    /// Operations that must be linearized (completed `ok`), by call time.
    req: Vec<Op>,
    /// Operations that may be linearized (outcome unknown), by call time.
    opt: Vec<Op>,
    /// For each optional operation, the previous optional one with the same effect. Two such
    /// operations never return, so once both are called they are interchangeable: the search
    /// only ever uses the earliest unused one, which keeps it from trying every subset of them.
    opt_prev: Vec<Option<usize>>,
}

impl<'a> History<'a> {
    fn new(src: &'a [&'a Operation]) -> History<'a> {
        let mut codes: HashMap<u64, Val> = HashMap::new();
        for o in src {
            let compared = match (o.outcome, &o.op) {
                (Kind::Fail, _) => None,
                (Kind::Ok, KvOp::Read { value }) => *value,
                (_, KvOp::Cas { from, .. }) => Some(*from),
                _ => None,
            };
            if let Some(v) = compared {
                let next = codes.len() as Val + 2;
                codes.entry(v).or_insert(next);
            }
        }
        let val = |v: Option<u64>| v.map_or(ABSENT, |v| codes.get(&v).copied().unwrap_or(UNSEEN));
        let (mut req, mut opt) = (Vec::new(), Vec::new());
        for (i, o) in src.iter().enumerate() {
            let done = o.outcome == Kind::Ok;
            let f = match &o.op {
                _ if o.outcome == Kind::Fail => continue,
                KvOp::Read { value } if done => F::Read(val(*value)),
                KvOp::Read { .. } => continue,
                KvOp::Write { value } => F::Write(val(Some(*value))),
                KvOp::Cas { from, to, succeeded } => {
                    F::Cas { from: val(Some(*from)), to: val(Some(*to)), ok: if done { *succeeded } else { None } }
                }
            };
            if done {
                // An `ok` without a return time still happened: it must be linearized, at any time.
                let ret = o.ret.unwrap_or(u64::MAX).max(o.call);
                req.push(Op { call: o.call, ret, f, src: i });
            } else {
                opt.push(Op { call: o.call, ret: u64::MAX, f, src: i });
            }
        }
        req.sort_by_key(|o| (o.call, o.ret, o.src));
        opt.sort_by_key(|o| (o.call, o.src));
        let mut last: HashMap<F, usize> = HashMap::new();
        let opt_prev = opt.iter().enumerate().map(|(i, o)| last.insert(o.f, i)).collect();
        History { src, req, opt, opt_prev }
    }

    fn search(&self, started: Instant, budget: Duration) -> Verdict {
        let (req, opt) = (&self.req, &self.opt);
        let n = req.len();
        // The list: entry 2i is the call of req[i], 2i + 1 its return; `head` is the sentinel.
        let head = 2 * n;
        let mut order: Vec<(u64, bool, usize)> =
            req.iter().enumerate().flat_map(|(i, o)| [(o.call, false, 2 * i), (o.ret, true, 2 * i + 1)]).collect();
        order.sort_unstable();
        let mut list = List { next: vec![NIL; 2 * n + 1], prev: vec![NIL; 2 * n + 1] };
        let mut last = head;
        for &(_, _, e) in &order {
            list.next[last] = e;
            list.prev[e] = last;
            last = e;
        }

        let mut done_bits = vec![0u64; n.div_ceil(64)];
        let mut opt_bits = vec![0u64; opt.len().div_ceil(64)];
        let mut seen = Seen::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut state = ABSENT;
        let mut done = 0usize;
        let mut cursor = Cursor::List(list.next[head]);
        let mut best: Option<Best> = None;
        let mut steps = 0u64;
        loop {
            if done == n {
                return Verdict::Linearizable;
            }
            steps += 1;
            if steps.is_multiple_of(1024) {
                let deepest = best.as_ref().map_or(0, |b| b.done);
                if started.elapsed() > budget {
                    return Verdict::Unknown {
                        reason: format!(
                            "gave up after {budget:?} and {steps} search steps; at most {deepest} of {n} completed \
                             operations linearized so far"
                        ),
                    };
                }
                if seen.bytes > MAX_MEMO_BYTES {
                    return Verdict::Unknown {
                        reason: format!(
                            "gave up after {} configurations ({steps} search steps); at most {deepest} of {n} \
                             completed operations linearized so far",
                            seen.set.len()
                        ),
                    };
                }
            }
            match cursor {
                Cursor::List(e) => {
                    // While an operation is pending its return is in the list, so `e` is an entry.
                    let i = e / 2;
                    if e % 2 == 1 {
                        // The first return: only operations called before it may come next.
                        if best.as_ref().is_none_or(|b| done > b.done) {
                            best = Some(self.best(&list, head, e, &stack, done));
                        }
                        cursor = Cursor::Opt { idx: 0, bound: req[i].ret };
                        continue;
                    }
                    let f = req[i].f;
                    let Some(next) = step(state, f).filter(|next| self.may_follow(&stack, f, true, *next)) else {
                        cursor = Cursor::List(list.next[e]);
                        continue;
                    };
                    set(&mut done_bits, i, true);
                    if !seen.insert(next, &done_bits, &opt_bits) {
                        set(&mut done_bits, i, false);
                        cursor = Cursor::List(list.next[e]);
                        continue;
                    }
                    stack.push(Frame { applied: Applied::Req(i), before: state });
                    state = next;
                    done += 1;
                    list.lift(i);
                    cursor = Cursor::List(list.next[head]);
                }
                Cursor::Opt { idx, bound } if idx < opt.len() && opt[idx].call <= bound => {
                    cursor = Cursor::Opt { idx: idx + 1, bound };
                    if get(&opt_bits, idx) || self.opt_prev[idx].is_some_and(|p| !get(&opt_bits, p)) {
                        continue;
                    }
                    // An optional operation that changes nothing is better left out.
                    let f = opt[idx].f;
                    let Some(next) =
                        step(state, f).filter(|next| *next != state && self.may_follow(&stack, f, false, *next))
                    else {
                        continue;
                    };
                    // Not memoized: what may follow depends on this operation, and the configuration
                    // before it was memoized, so the search reaches this one only once.
                    set(&mut opt_bits, idx, true);
                    stack.push(Frame { applied: Applied::Opt { idx, bound }, before: state });
                    state = next;
                    cursor = Cursor::List(list.next[head]);
                }
                Cursor::Opt { .. } => {
                    // Nothing more to try here: undo the last step and try its next sibling.
                    let Some(frame) = stack.pop() else {
                        return Verdict::NotLinearizable { explanation: self.explain(best, n) };
                    };
                    state = frame.before;
                    match frame.applied {
                        Applied::Req(i) => {
                            set(&mut done_bits, i, false);
                            done -= 1;
                            list.unlift(i);
                            cursor = Cursor::List(list.next[2 * i]);
                        }
                        Applied::Opt { idx, bound } => {
                            set(&mut opt_bits, idx, false);
                            cursor = Cursor::Opt { idx: idx + 1, bound };
                        }
                    }
                }
            }
        }
    }

    /// Whether `y`, taking the register to `next`, may be linearized now. Right after an optional
    /// operation x, only if x matters to it: if y would do the same without x, x is better left
    /// out, and if y (a completed operation) could go first with x after it to the same end, x is
    /// better delayed. Some linearization obeys both rules whenever any does: dropping x lowers
    /// the number of optional operations linearized, and delaying x past a completed operation
    /// moves it towards the end, so repeating either terminates.
    fn may_follow(&self, stack: &[Frame], y: F, required: bool, next: Val) -> bool {
        let Some(Frame { applied: Applied::Opt { idx, .. }, before }) = stack.last() else { return true };
        match step(*before, y) {
            None => true,
            Some(alone) => alone != next && !(required && step(alone, self.opt[*idx].f) == Some(next)),
        }
    }

    /// Records a configuration where the search is stuck at the return entry `ret`.
    fn best(&self, list: &List, head: usize, ret: usize, stack: &[Frame], done: usize) -> Best {
        let prefix = stack
            .iter()
            .map(|f| match f.applied {
                Applied::Req(i) => self.req[i].src,
                Applied::Opt { idx, .. } => self.opt[idx].src,
            })
            .collect();
        let mut pending = Vec::new();
        let mut e = list.next[head];
        while e != ret && e != NIL {
            if e.is_multiple_of(2) {
                pending.push(self.req[e / 2].src);
            }
            e = list.next[e];
        }
        // The operation that returns first goes first in the explanation.
        let first = self.req[ret / 2].src;
        pending.retain(|s| *s != first);
        pending.insert(0, first);
        Best { done, prefix, pending }
    }

    fn explain(&self, best: Option<Best>, n: usize) -> String {
        let Some(best) = best else { return "no operation can be linearized".to_string() };
        // The register's value after the prefix, replayed with the real values.
        let mut value: Option<u64> = None;
        for s in &best.prefix {
            match self.src[*s].op {
                KvOp::Write { value: v } => value = Some(v),
                KvOp::Cas { from, to, .. } if value == Some(from) => value = Some(to),
                _ => {}
            }
        }
        let mut out = format!(
            "at most {} of {n} completed operations can be linearized; the longest linearizable prefix has {} \
             operations",
            best.done,
            best.prefix.len()
        );
        if !best.prefix.is_empty() {
            out += ", ending:";
        }
        for s in best.prefix.iter().skip(best.prefix.len().saturating_sub(3)) {
            out += &format!("\n  {}", describe(self.src[*s]));
        }
        out += &format!("\nthen the register holds {}, and none of these can come next:", show(value));
        for s in best.pending.iter().take(5) {
            out += &format!("\n  {}", describe(self.src[*s]));
        }
        if best.pending.len() > 5 {
            out += &format!("\n  and {} more", best.pending.len() - 5);
        }
        out
    }
}

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "nothing (absent)".to_string(), |v| v.to_string())
}

/// One line about an operation, for explanations.
fn describe(o: &Operation) -> String {
    let what = match &o.op {
        KvOp::Read { value } => format!("read {}", show(*value)),
        KvOp::Write { value } => format!("write {value}"),
        KvOp::Cas { from, to, succeeded } => {
            let result = match (o.outcome, succeeded) {
                (Kind::Ok, Some(true)) => "swapped",
                (Kind::Ok, Some(false)) => "did not swap",
                _ => "outcome unknown",
            };
            format!("cas {from} -> {to} ({result})")
        }
    };
    let when = match (o.outcome, o.ret) {
        (Kind::Ok, Some(ret)) => format!("called at {} ns, returned at {ret} ns", o.call),
        _ => format!("called at {} ns, never returned", o.call),
    };
    format!("process {} {what}, {when}", o.process)
}

/// The furthest the search got, for the explanation.
struct Best {
    /// Completed operations linearized.
    done: usize,
    /// The operations linearized, in order (indexes into the checked operations).
    prefix: Vec<usize>,
    /// The completed operations that could come next, the first to return first.
    pending: Vec<usize>,
}

const NIL: usize = usize::MAX;

/// The doubly linked list of call and return entries.
struct List {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl List {
    /// Takes operation `i`'s call and return out of the list.
    fn lift(&mut self, i: usize) {
        for e in [2 * i, 2 * i + 1] {
            let (p, n) = (self.prev[e], self.next[e]);
            self.next[p] = n;
            if n != NIL {
                self.prev[n] = p;
            }
        }
    }

    /// Puts back what the matching `lift` took out (lifts are undone in reverse order).
    fn unlift(&mut self, i: usize) {
        for e in [2 * i + 1, 2 * i] {
            let (p, n) = (self.prev[e], self.next[e]);
            self.next[p] = e;
            if n != NIL {
                self.prev[n] = e;
            }
        }
    }
}

/// Where the search is in the current configuration's candidates: a list entry, or (once the
/// first return is reached) the optional operations called no later than that return.
#[derive(Clone, Copy)]
enum Cursor {
    List(usize),
    Opt { idx: usize, bound: u64 },
}

#[derive(Clone, Copy)]
enum Applied {
    Req(usize),
    Opt { idx: usize, bound: u64 },
}

/// One linearized operation on the search stack, with the register's value before it.
struct Frame {
    applied: Applied,
    before: Val,
}

fn get(bits: &[u64], i: usize) -> bool {
    bits[i / 64] >> (i % 64) & 1 == 1
}

fn set(bits: &mut [u64], i: usize, on: bool) {
    if on {
        bits[i / 64] |= 1 << (i % 64);
    } else {
        bits[i / 64] &= !(1 << (i % 64));
    }
}

/// The memo stops growing past this, and the verdict is then unknown.
const MAX_MEMO_BYTES: usize = 1 << 30;

/// A configuration, compactly: completed operations are linearized roughly in call order, so
/// their bitset is a run of full words and a short tail; the optional operations' bitset drops
/// its leading and trailing empty words.
#[derive(PartialEq, Eq, Hash)]
struct Config {
    state: Val,
    full: u32,
    done_len: u32,
    opt_lead: u32,
    words: Box<[u64]>,
}

#[derive(Default)]
struct Seen {
    set: HashSet<Config, BuildHasherDefault<Fx>>,
    bytes: usize,
}

impl Seen {
    /// Adds a configuration; false if it was already there.
    fn insert(&mut self, state: Val, done: &[u64], opt: &[u64]) -> bool {
        let full = done.iter().take_while(|w| **w == u64::MAX).count();
        let done_end = done.iter().rposition(|w| *w != 0).map_or(full, |p| p + 1).max(full);
        let opt_lead = opt.iter().take_while(|w| **w == 0).count();
        let opt_end = opt.iter().rposition(|w| *w != 0).map_or(opt_lead, |p| p + 1);
        let words: Box<[u64]> = done[full..done_end].iter().chain(&opt[opt_lead..opt_end]).copied().collect();
        let size = 64 + 8 * words.len();
        let config =
            Config { state, full: full as u32, done_len: (done_end - full) as u32, opt_lead: opt_lead as u32, words };
        let new = self.set.insert(config);
        if new {
            self.bytes += size;
        }
        new
    }
}

/// A small fast hasher (FxHash's mixing) with a final avalanche, for the memo.
#[derive(Default)]
struct Fx(u64);

impl Fx {
    fn add(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(n.into());
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: u64, call: u64, ret: Option<u64>, outcome: Kind, op: KvOp) -> Operation {
        Operation { process, key: "k".into(), call, ret, op, outcome }
    }
    fn w(p: u64, call: u64, ret: u64, v: u64) -> Operation {
        op(p, call, Some(ret), Kind::Ok, KvOp::Write { value: v })
    }
    fn r(p: u64, call: u64, ret: u64, v: Option<u64>) -> Operation {
        op(p, call, Some(ret), Kind::Ok, KvOp::Read { value: v })
    }
    fn cas(p: u64, call: u64, ret: u64, from: u64, to: u64, ok: bool) -> Operation {
        op(p, call, Some(ret), Kind::Ok, KvOp::Cas { from, to, succeeded: Some(ok) })
    }
    fn info_w(p: u64, call: u64, v: u64) -> Operation {
        op(p, call, None, Kind::Info, KvOp::Write { value: v })
    }
    fn check(ops: &[Operation]) -> Verdict {
        check_key("k", ops, Duration::from_secs(10)).verdict
    }
    fn bad(v: &Verdict) -> bool {
        matches!(v, Verdict::NotLinearizable { .. })
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [w(1, 0, 1, 1), r(1, 2, 3, Some(1)), cas(1, 4, 5, 1, 2, true), r(1, 6, 7, Some(2))];
        assert_eq!(check(&h), Verdict::Linearizable);
        let h = [r(1, 0, 1, None), w(1, 2, 3, 1), cas(1, 4, 5, 5, 2, false), r(1, 6, 7, Some(1))];
        assert_eq!(check(&h), Verdict::Linearizable);
        assert_eq!(check(&[]), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_histories_may_go_either_way() {
        // A read overlapping a write may see the old or the new value.
        for seen in [None, Some(1)] {
            assert_eq!(check(&[w(1, 0, 10, 1), r(2, 5, 6, seen)]), Verdict::Linearizable);
        }
        // Two overlapping writes, and a later read of either.
        for seen in [1, 2] {
            assert_eq!(check(&[w(1, 0, 10, 1), w(2, 1, 9, 2), r(3, 11, 12, Some(seen))]), Verdict::Linearizable);
        }
        // Overlapping swaps: only one of two identical swaps can succeed, in either order.
        let h = [w(1, 0, 1, 1), cas(2, 2, 10, 1, 2, false), cas(3, 3, 9, 1, 3, true), r(1, 11, 12, Some(3))];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn a_return_and_a_call_at_the_same_instant_are_concurrent() {
        assert_eq!(check(&[w(1, 0, 5, 1), r(2, 5, 6, None)]), Verdict::Linearizable);
        assert!(bad(&check(&[w(1, 0, 5, 1), r(2, 6, 7, None)])));
    }

    #[test]
    fn a_stale_read_is_caught() {
        assert!(bad(&check(&[w(1, 0, 1, 1), r(2, 2, 3, None)])));
        assert!(bad(&check(&[w(1, 0, 1, 1), w(1, 2, 3, 2), r(2, 4, 5, Some(1)), w(1, 6, 7, 3)])));
    }

    #[test]
    fn a_lost_write_is_caught() {
        // 2 acknowledged after 1, but later reads show 1 and nobody else wrote.
        let h = [w(1, 0, 1, 1), w(2, 2, 3, 2), r(3, 4, 5, Some(1)), r(1, 6, 7, Some(1))];
        assert!(bad(&check(&h)));
    }

    #[test]
    fn an_impossible_swap_is_caught() {
        // Claims success although the value could not have been `from`.
        assert!(bad(&check(&[w(1, 0, 1, 1), cas(2, 2, 3, 7, 8, true)])));
        // Claims failure although the value was `from`.
        assert!(bad(&check(&[w(1, 0, 1, 7), cas(2, 2, 3, 7, 8, false)])));
        // Two swaps from the same value both claim success.
        assert!(bad(&check(&[w(1, 0, 1, 1), cas(2, 2, 5, 1, 2, true), cas(3, 2, 5, 1, 3, true)])));
    }

    #[test]
    fn reads_going_back_in_time_are_caught() {
        // 1 then 2 written in order, concurrently with both reads; r1 sees 2, a later r2 sees 1.
        let h = [w(1, 0, 10, 1), w(1, 11, 30, 2), r(2, 12, 13, Some(2)), r(3, 14, 15, Some(1))];
        assert!(bad(&check(&h)));
        // The same reads overlapping each other are fine.
        let h = [w(1, 0, 10, 1), w(1, 11, 30, 2), r(2, 12, 15, Some(2)), r(3, 14, 16, Some(1))];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        // Seen later: it happened.
        assert_eq!(check(&[info_w(1, 0, 5), r(2, 10, 11, Some(5))]), Verdict::Linearizable);
        // Seen while still running, then overwritten.
        assert_eq!(
            check(&[info_w(1, 0, 5), r(2, 1, 2, Some(5)), w(3, 3, 4, 6), r(2, 5, 6, Some(6))]),
            Verdict::Linearizable
        );
        // Never seen: it did not happen, or was overwritten unseen.
        assert_eq!(check(&[w(2, 0, 1, 1), info_w(1, 2, 5), r(2, 10, 11, Some(1))]), Verdict::Linearizable);
        // Seen before it was even called: impossible.
        assert!(bad(&check(&[r(2, 0, 1, Some(5)), info_w(1, 2, 5)])));
        // It happens once: seen, overwritten, then seen again.
        let h = [info_w(1, 0, 5), r(2, 1, 2, Some(5)), w(3, 3, 4, 6), r(2, 5, 6, Some(5))];
        assert!(bad(&check(&h)));
        // An unknown read carries nothing.
        let unknown_read = op(3, 0, None, Kind::Info, KvOp::Read { value: Some(77) });
        assert_eq!(check(&[w(1, 0, 1, 1), unknown_read]), Verdict::Linearizable);
        // An unknown swap may have swapped, and it is the only way to explain the read.
        let info_cas = op(3, 2, None, Kind::Info, KvOp::Cas { from: 1, to: 9, succeeded: None });
        assert_eq!(check(&[w(1, 0, 1, 1), info_cas.clone(), r(2, 5, 6, Some(9))]), Verdict::Linearizable);
        // But only if the value was `from` at the time.
        assert!(bad(&check(&[w(1, 0, 1, 2), info_cas, r(2, 5, 6, Some(9))])));
    }

    #[test]
    fn an_unknown_write_can_make_a_swap_fail() {
        // The value is 1 when the swap from 1 runs and fails, unless the unknown write intervened.
        let h = [w(1, 0, 1, 1), info_w(2, 2, 5), cas(3, 10, 11, 1, 3, false)];
        assert_eq!(check(&h), Verdict::Linearizable);
        let h = [w(1, 0, 1, 1), info_w(2, 12, 5), cas(3, 10, 11, 1, 3, false)];
        assert!(bad(&check(&h)));
    }

    #[test]
    fn failed_operations_never_happened() {
        let failed = op(1, 0, Some(1), Kind::Fail, KvOp::Write { value: 9 });
        assert!(bad(&check(&[failed.clone(), r(2, 2, 3, Some(9))])));
        assert_eq!(check(&[failed, r(2, 2, 3, None)]), Verdict::Linearizable);
        let report = check_key("k", &[op(1, 0, Some(1), Kind::Fail, KvOp::Read { value: None })], Duration::ZERO);
        assert_eq!((report.ops, report.verdict), (0, Verdict::Linearizable));
    }

    #[test]
    fn many_unknown_writes_nobody_saw_stay_cheap() {
        // Forty unknown writes that nobody observed, interleaved with an ordinary history.
        let mut h: Vec<Operation> = (0..40).map(|i| info_w(100 + i, i * 10, 10_000 + i)).collect();
        for i in 0..200u64 {
            h.push(w(1, i * 4, i * 4 + 1, i + 1));
            h.push(r(2, i * 4 + 2, i * 4 + 3, Some(i + 1)));
        }
        let report = check_key("k", &h, Duration::from_secs(5));
        assert_eq!(report.verdict, Verdict::Linearizable, "{:?}", report.elapsed);
        // A violation among them is still found, and quickly.
        h.push(r(3, 10_000, 10_001, Some(7)));
        let report = check_key("k", &h, Duration::from_secs(5));
        assert!(bad(&report.verdict), "{:?} after {:?}", report.verdict, report.elapsed);
    }

    #[test]
    fn the_explanation_names_the_culprit() {
        let h = [w(1, 0, 1, 1), w(1, 2, 3, 2), r(2, 4, 5, Some(2)), r(3, 6, 7, Some(1))];
        let Verdict::NotLinearizable { explanation } = check(&h) else { panic!("linearizable?") };
        eprintln!("{explanation}");
        assert!(explanation.lines().count() <= 10, "{explanation}");
        assert!(explanation.contains("at most 3 of 4"), "{explanation}");
        assert!(explanation.contains("process 3 read 1, called at 6 ns, returned at 7 ns"), "{explanation}");
        assert!(explanation.contains("the register holds 2"), "{explanation}");
    }

    #[test]
    fn keys_are_checked_separately() {
        // On one register the read of nothing would be stale; on its own key it is fine.
        let mut absent = r(3, 4, 5, None);
        absent.key = "a".into();
        let h = [w(1, 0, 1, 1), r(2, 2, 3, Some(1)), absent, r(2, 6, 7, None)];
        let reports = check_all(&h, Duration::from_secs(1));
        let got: Vec<(&str, usize, bool)> =
            reports.iter().map(|r| (r.key.as_str(), r.ops, r.verdict == Verdict::Linearizable)).collect();
        assert_eq!(got, [("a", 1, true), ("k", 3, false)]);
    }

    #[test]
    fn a_spent_budget_is_unknown_not_a_verdict() {
        // Many concurrent writes and one read that sees none of them: the search must try every
        // subset of the writes before it can give up.
        let mut h: Vec<Operation> = (0..40).map(|i| w(i, 0, 1000, i + 1)).collect();
        h.push(r(99, 900, 1002, Some(12345)));
        for budget in [Duration::ZERO, Duration::from_micros(1), Duration::from_millis(20)] {
            let v = check_key("k", &h, budget).verdict;
            assert!(matches!(v, Verdict::Unknown { .. }), "{v:?}");
        }
    }

    /// A tiny deterministic generator (xorshift), so the tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Decides a tiny history by trying every order (and every subset of the optional operations).
    fn brute_force(ops: &[Operation]) -> bool {
        let ops: Vec<&Operation> = ops
            .iter()
            .filter(|o| o.outcome != Kind::Fail && (o.outcome == Kind::Ok || !matches!(o.op, KvOp::Read { .. })))
            .collect();
        fn go(ops: &[&Operation], used: u32, value: Option<u64>) -> bool {
            let pending = |i: usize| used & (1 << i) == 0;
            if (0..ops.len()).all(|i| !pending(i) || ops[i].outcome != Kind::Ok) {
                return true;
            }
            (0..ops.len()).filter(|&i| pending(i)).any(|i| {
                // Every completed operation that returned before this one was called goes first.
                let blocked = (0..ops.len()).any(|j| {
                    pending(j) && ops[j].outcome == Kind::Ok && ops[j].ret.is_some_and(|ret| ret < ops[i].call)
                });
                let next = match ops[i].op {
                    KvOp::Read { value: seen } => (seen == value).then_some(value),
                    KvOp::Write { value } => Some(Some(value)),
                    KvOp::Cas { from, to, succeeded } => {
                        let swaps = value == Some(from);
                        match succeeded {
                            Some(ok) if ops[i].outcome == Kind::Ok && ok != swaps => None,
                            _ => Some(if swaps { Some(to) } else { value }),
                        }
                    }
                };
                !blocked && next.is_some_and(|next| go(ops, used | 1 << i, next))
            })
        }
        go(&ops, 0, None)
    }

    fn random_tiny(rng: &mut Rng) -> Vec<Operation> {
        let n = 1 + rng.below(8);
        let value = |rng: &mut Rng| 1 + rng.below(3);
        (0..n)
            .map(|p| {
                let call = rng.below(12);
                let ret = call + rng.below(6);
                let outcome = match rng.below(10) {
                    0..=5 => Kind::Ok,
                    6..=8 => Kind::Info,
                    _ => Kind::Fail,
                };
                let kvop = match rng.below(3) {
                    0 => KvOp::Read { value: if rng.below(4) == 0 { None } else { Some(value(rng)) } },
                    1 => KvOp::Write { value: value(rng) },
                    _ => {
                        let (from, to, ok) = (value(rng), value(rng), rng.below(2) == 0);
                        KvOp::Cas { from, to, succeeded: (outcome == Kind::Ok && rng.below(5) != 0).then_some(ok) }
                    }
                };
                let ret = (outcome != Kind::Info).then_some(ret);
                op(p, call, ret, outcome, kvop)
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_tiny_histories() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..30_000 {
            let h = random_tiny(&mut rng);
            let expected = brute_force(&h);
            let got = check(&h);
            assert_eq!(got == Verdict::Linearizable, expected, "{h:#?}\n{got:?}");
            assert!(got == Verdict::Linearizable || bad(&got), "{got:?}");
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        eprintln!("{yes} linearizable, {no} not");
        assert!(yes > 3000 && no > 3000, "{yes} {no}");
    }

    /// A real register run by several processes: each operation takes effect at one instant
    /// inside its interval, so the history is linearizable by construction. About
    /// `info_percent`% of the writes and swaps end `info`, and half of those take effect; a process
    /// whose operation ended `info` continues as a new process, as in Jepsen.
    fn generated(seed: u64, n: usize, processes: usize, info_percent: u64) -> Vec<Operation> {
        let mut rng = Rng(seed);
        let mut value: Option<u64> = None;
        let mut free_at = vec![0u64; processes];
        let mut ids: Vec<u64> = (0..processes as u64).collect();
        let mut out = Vec::new();
        let mut t = 10u64;
        let mut next_value = 0;
        for _ in 0..n {
            t += 1 + rng.below(5);
            let c = rng.below(processes as u64) as usize;
            let call = free_at[c].max(t.saturating_sub(rng.below(20)));
            let at = call.max(t);
            t = at;
            let ret = at + rng.below(30);
            let info = rng.below(100) < info_percent;
            let happens = !info || rng.below(2) == 0;
            let (kvop, outcome) = match rng.below(3) {
                0 => (KvOp::Read { value }, Kind::Ok),
                1 => {
                    next_value += 1;
                    if happens {
                        value = Some(next_value);
                    }
                    (KvOp::Write { value: next_value }, if info { Kind::Info } else { Kind::Ok })
                }
                _ => {
                    let from = if rng.below(2) == 0 { value.unwrap_or(1) } else { 999_999 };
                    next_value += 1;
                    let swaps = value == Some(from);
                    if swaps && happens {
                        value = Some(next_value);
                    }
                    let succeeded = (!info).then_some(swaps);
                    (KvOp::Cas { from, to: next_value, succeeded }, if info { Kind::Info } else { Kind::Ok })
                }
            };
            let info = outcome == Kind::Info;
            out.push(op(ids[c], call, (!info).then_some(ret), outcome, kvop));
            if info {
                ids[c] += processes as u64;
            }
            free_at[c] = ret + 1;
        }
        out
    }

    #[test]
    fn generated_histories_pass_and_corrupted_reads_are_caught() {
        for seed in 1..40 {
            let h = generated(seed, 300, 5, 5);
            assert_eq!(check(&h), Verdict::Linearizable, "seed {seed}");
        }
        // A read that returns a value nobody ever wrote is always caught.
        let mut h = generated(7, 300, 5, 5);
        let i = h.iter().position(|o| matches!(o.op, KvOp::Read { .. })).unwrap();
        h[i].op = KvOp::Read { value: Some(424_242) };
        assert!(bad(&check(&h)));
        // A read that returns another value: caught unless that value could have been current.
        let mut caught = 0;
        let tries = 40;
        for seed in 0..tries {
            let mut rng = Rng(1000 + seed);
            let mut h = generated(1000 + seed, 300, 5, 5);
            let reads: Vec<usize> = (0..h.len()).filter(|i| matches!(h[*i].op, KvOp::Read { .. })).collect();
            let i = reads[rng.below(reads.len() as u64) as usize];
            let KvOp::Read { value } = h[i].op else { unreachable!() };
            let other = value.unwrap_or(0) as i64 + if rng.below(2) == 0 { -5 } else { 5 };
            h[i].op = KvOp::Read { value: (other > 0).then_some(other as u64) };
            let report = check_key("k", &h, Duration::from_secs(10));
            assert!(!matches!(report.verdict, Verdict::Unknown { .. }), "{:?}", report.verdict);
            if bad(&report.verdict) {
                caught += 1;
            }
        }
        eprintln!("{caught} of {tries} corrupted reads caught");
        assert!(caught * 4 >= tries * 3, "{caught} of {tries}");
    }

    #[test]
    fn two_thousand_operations_are_checked_quickly() {
        let h = generated(42, 2000, 5, 5);
        let infos = h.iter().filter(|o| o.outcome == Kind::Info).count();
        let report = check_key("k", &h, Duration::from_secs(10));
        eprintln!("2,000 operations ({infos} info) checked in {:?}", report.elapsed);
        assert_eq!(report.verdict, Verdict::Linearizable);
    }
}
