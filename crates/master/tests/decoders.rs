//! Property tests of every decoder that reads bytes from outside the process: arbitrary input
//! never panics, and never makes the decoder allocate past its limit: the frame codec no more
//! than the input justifies (a length prefix claiming megabytes is not believed before the bytes
//! arrive); bincode (stored records, Raft messages) no more than its configured limit (it
//! believes a claimed length up to that limit).
//!
//! - the QUIC frame codec with every `AgentFrame` / `MasterFrame`;
//! - the stored-record envelope (log entries, key-values, counters);
//! - the Raft wire messages (vote, append entries);
//! - the join token and identity parsers;
//! - the spec parser.
//!
//! A counting global allocator (per thread: proptest cases run on the test's own thread) gives
//! the peak bytes allocated while one decode runs. It is the one `unsafe` in the workspace: a
//! `GlobalAlloc` can only be implemented so, and it only forwards to the system allocator.

#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use berth_api::pb::agent::{AgentFrame, MasterFrame};
use berth_channel::{FrameReader, GROW_STEP, MAX_FRAME};
use berth_store::TypeConfig;
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(by: isize) {
    // try_with: the thread's locals may be gone while it exits.
    let _ = LIVE.try_with(|l| {
        let now = l.get() + by;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        grew(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grew(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the most it had allocated at once (bytes, on this thread).
fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    let top = PEAK.with(Cell::get);
    (r, (top - start).max(0) as usize)
}

/// What decoding `n` bytes may allocate at most: a few times the input (decoded messages hold
/// copies of its strings and bytes), plus a fixed allowance.
fn allowance(n: usize) -> usize {
    8 * n + 256 * 1024
}

/// Reads frames from `bytes` until the end or an error, as a session does.
fn read_frames<M: prost::Message + Default>(rt: &tokio::runtime::Runtime, bytes: &[u8]) -> usize {
    rt.block_on(async {
        let mut r = FrameReader::with_max(bytes, MAX_FRAME);
        let mut n = 0;
        while let Ok(Some(_)) = r.recv::<M>().await {
            n += 1;
        }
        n
    })
}

fn frame(body: &[u8], claimed: Option<u32>) -> Vec<u8> {
    let mut out = claimed.unwrap_or(body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The measure itself: a known allocation is seen (the properties below are not vacuous).
#[test]
fn the_counting_allocator_sees_allocations() {
    let (v, bytes) = peak(|| vec![7u8; 1 << 20]);
    assert!(bytes >= 1 << 20, "{bytes}");
    drop(v);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes on an agent's or a master's stream.
    #[test]
    fn frames_of_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (_, a) = peak(|| read_frames::<AgentFrame>(&rt, &bytes));
        let (_, m) = peak(|| read_frames::<MasterFrame>(&rt, &bytes));
        prop_assert!(a.max(m) <= allowance(bytes.len()) + GROW_STEP, "{} bytes allocated for {} read", a.max(m), bytes.len());
    }

    /// A well-framed body of arbitrary bytes, and a header claiming up to MAX_FRAME (and more)
    /// with only a few bytes behind it.
    #[test]
    fn framed_bodies_and_lying_headers(body in proptest::collection::vec(any::<u8>(), 0..4096), claimed in any::<u32>()) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let honest = frame(&body, None);
        let (_, a) = peak(|| read_frames::<AgentFrame>(&rt, &honest));
        prop_assert!(a <= allowance(honest.len()) + GROW_STEP, "{a} bytes for an honest frame of {}", honest.len());
        let lying = frame(&body, Some(claimed));
        let (_, b) = peak(|| read_frames::<MasterFrame>(&rt, &lying));
        prop_assert!(b <= allowance(lying.len()) + 2 * GROW_STEP, "{b} bytes for a header claiming {claimed}");
    }

    /// Stored records: a corrupt or hostile value read back from the database.
    #[test]
    fn stored_records(mut bytes in proptest::collection::vec(any::<u8>(), 0..4096), format in 0u8..3) {
        if let Some(first) = bytes.first_mut() {
            *first = format;
        }
        let (_, a) = peak(|| berth_store::decode_record::<openraft::type_config::alias::EntryOf<TypeConfig>>(&bytes, "log entry").is_ok());
        let (_, b) = peak(|| berth_store::decode_record::<berth_types::KeyValue>(&bytes, "key-value").is_ok());
        let (_, c) = peak(|| berth_store::decode_record::<berth_store::Counters>(&bytes, "counters").is_ok());
        // bincode believes a length up to its limit before reading the bytes: the bound is the
        // envelope's limit, not the input's size.
        prop_assert!(a.max(b).max(c) <= berth_store::DECODE_LIMIT + allowance(bytes.len()), "{} bytes for a record of {}", a.max(b).max(c), bytes.len());
    }

    /// Raft messages from a peer.
    #[test]
    fn raft_wire_messages(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        use openraft::raft::{AppendEntriesRequest, VoteRequest};
        let (_, a) = peak(|| berth_master::decode_raft_message::<VoteRequest<TypeConfig>>(&bytes).is_ok());
        let (_, b) = peak(|| berth_master::decode_raft_message::<AppendEntriesRequest<TypeConfig>>(&bytes).is_ok());
        prop_assert!(a.max(b) <= berth_master::RAFT_WIRE_LIMIT + allowance(bytes.len()), "{} bytes for a message of {}", a.max(b), bytes.len());
    }

    /// Join tokens and identities, as typed or sent by anyone.
    #[test]
    fn tokens_and_identities(text in ".{0,300}", tail in "[a-z0-9.-]{0,80}") {
        let _ = berth_pki::JoinToken::parse(&text);
        let _ = berth_pki::JoinToken::parse(&format!("BERTH-1-{tail}"));
        let _ = berth_pki::Identity::parse(&text);
        let _ = berth_pki::normalize_serial(&text);
    }

    /// Specs: arbitrary text, and YAML-shaped text built from the spec's own words.
    #[test]
    fn specs(text in ".{0,2000}", words in proptest::collection::vec(
        prop_oneof![
            Just("kind: Service\n"), Just("kind: Route\n"), Just("kind: Network\n"), Just("kind: Volume\n"),
            Just("metadata: {name: a}\n"), Just("spec:\n"), Just("  replicas: 99999999999999999999\n"),
            Just("  task: {image: x, command: [a]}\n"), Just("  task:\n    resources: {cpu: 1e999, memory: 9Ei}\n"),
            Just("---\n"), Just("  - "), Just("&a [*a, *a]\n"), Just("{"), Just("}"), Just(":"), Just("\"\\u0000\"\n"),
            Just("  ports: [{container: 70000, published: -1}]\n"), Just("  host: 'x.apps.test'\n"),
        ],
        0..40,
    )) {
        let _ = berth_types::spec::parse_all(&text);
        let _ = berth_types::spec::parse_all(&words.concat());
    }
}
