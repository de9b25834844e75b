//! How many long-lived streams (watches, log streams) each client identity may hold open on a
//! master at once. A stream costs a task, a watcher on the apply broadcast and its buffers for
//! as long as it lives: without a bound, one admin certificate (or a buggy script) could open
//! them until the master runs out of memory.
//!
//! Masters are not counted: a follower relaying its clients' log streams to the leader counts
//! them itself, per client.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tonic::{Request, Status};

/// Watches (KV and services) one identity may have open on one master.
pub(crate) const MAX_WATCHES: usize = 256;
/// Log streams one identity may have open on one master.
pub(crate) const MAX_LOG_STREAMS: usize = 64;

#[derive(Default)]
pub(crate) struct ClientStreams {
    open: Mutex<HashMap<(&'static str, String), usize>>,
}

/// One open stream; dropping it (the stream ends or its client goes) frees its place.
pub(crate) struct StreamSlot {
    owner: Arc<ClientStreams>,
    key: (&'static str, String),
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().expect("streams lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl ClientStreams {
    /// A place for one more `kind` stream of the request's client, or RESOURCE_EXHAUSTED when
    /// it holds `max` already. None for masters (not counted).
    pub(crate) fn open<T>(
        self: &Arc<Self>,
        req: &Request<T>,
        kind: &'static str,
        max: usize,
    ) -> Result<Option<StreamSlot>, Status> {
        // The caller the interceptor (or the web console) authenticated; the certificate for a
        // request that came another way.
        let caller = req.extensions().get::<crate::authz::Caller>().map(|c| c.identity.clone());
        let who = match caller.or_else(|| crate::tls::peer_identity(req)) {
            Some(i) if matches!(i.role, berth_pki::Role::Master) => return Ok(None),
            Some(i) => i.to_string(),
            None => "unknown".to_string(),
        };
        self.open_for(who, kind, max).map(Some)
    }

    fn open_for(self: &Arc<Self>, who: String, kind: &'static str, max: usize) -> Result<StreamSlot, Status> {
        let key = (kind, who);
        let mut open = self.open.lock().expect("streams lock");
        let n = open.entry(key.clone()).or_default();
        if *n >= max {
            return Err(Status::resource_exhausted(format!(
                "{} has {max} {kind} streams open on this master, the most one client may: close some first",
                key.1
            )));
        }
        *n += 1;
        Ok(StreamSlot { owner: self.clone(), key })
    }

    #[cfg(test)]
    fn count(&self, kind: &'static str, who: &str) -> usize {
        self.open.lock().unwrap().get(&(kind, who.to_string())).copied().unwrap_or(0)
    }
}

/// `stream`, holding `slot` until it is dropped.
pub(crate) fn holding<S: futures::Stream + Send>(
    stream: S,
    slot: Option<StreamSlot>,
) -> impl futures::Stream<Item = S::Item> + Send {
    use futures::StreamExt;
    stream.map(move |item| {
        let _held = &slot;
        item
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_max_streams_and_a_closed_one_frees_its_place() {
        let s = Arc::new(ClientStreams::default());
        let held: Vec<StreamSlot> = (0..3).map(|_| s.open_for("admin/a".into(), "watch", 3).unwrap()).collect();
        let err = s.open_for("admin/a".into(), "watch", 3).err().unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("admin/a has 3 watch streams open"), "{}", err.message());
        // Another client and another kind are counted apart.
        let _other = s.open_for("admin/b".into(), "watch", 3).unwrap();
        let _logs = s.open_for("admin/a".into(), "log", 3).unwrap();
        drop(held);
        assert_eq!(s.count("watch", "admin/a"), 0);
        let _again = s.open_for("admin/a".into(), "watch", 3).unwrap();
    }
}
