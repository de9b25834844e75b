//! A client of the masters: bounded attempts, moving on to another master only when that is safe.
//!
//! Every attempt has two deadlines: connecting (TCP and the TLS handshake: a frozen master's
//! kernel still completes TCP handshakes, but the master never answers the TLS one) and the
//! request. After a failed attempt:
//! - the request never left (no connection), or the master said it did nothing with it ("not
//!   applied": not the leader, no live leader): every call moves on to another master;
//! - the request left and its answer was lost (no answer in time, connection reset): an
//!   idempotent call moves on; a non-idempotent write stops with "outcome unknown";
//! - any other answer is final.
//!
//! These decisions come from types, never from message text: the outcome the masters put in the
//! status metadata (`berth_api::outcome`), and the error source chain tonic keeps for transport
//! failures (h2 and I/O errors).

use std::{error::Error as StdError, fmt, future::Future, sync::Mutex, time::Duration};

use anyhow::{Context, Result, anyhow};
use berth_api::pb::{cluster_client::ClusterClient, kv_client::KvClient, nodes_client::NodesClient};
use tokio::time::Instant;
use tonic::{
    Code, Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

/// Largest message the client sends or accepts (the masters cap values at 1 MiB by default).
const MESSAGE_LIMIT: usize = 16 * 1024 * 1024;
/// Bound on connecting to one master, TLS handshake included (about 2 ms on loopback).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on one request to one master, until its answer (or a stream's first response). Longer
/// than a master holds a request while it waits for a live leader (10 election timeouts, 2 s by
/// default), so that its "not applied" answer arrives before this client gives up.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one master whose requests carry this attempt's deadline (`grpc-timeout`), so
/// that a master waiting on the request's behalf (for a leader, a commit) answers before the
/// client gives up, saying what it knows.
pub type Conn = InterceptedService<Channel, Deadline>;

/// Sets `grpc-timeout` on every request (nothing when None).
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Option<Duration>);

impl Interceptor for Deadline {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(d) = self.0 {
            req.set_timeout(d);
        }
        Ok(req)
    }
}

/// Whether a call may be sent twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Sending it twice has the effect of sending it once: reads, and writes of a final state
    /// (scale to N, apply a spec, delete, pause). Moves on to another master after a lost answer.
    Idempotent,
    /// A write that must not be repeated blindly (a put, a compare-and-swap, creating a token,
    /// a membership change). Moves on only when it cannot have been sent or acted on.
    Once,
}

/// What a failed attempt says about its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// It reached no master, or the master did nothing with it.
    NotApplied,
    /// It may have been acted on: it left, and its answer was lost.
    Unknown,
    /// A final answer (invalid argument, not found, precondition, permission...).
    Final,
}

/// Classifies a failed request's status.
pub fn classify(s: &Status) -> Failure {
    match berth_api::outcome(s) {
        Some(berth_api::Outcome::NotApplied) => return Failure::NotApplied,
        Some(berth_api::Outcome::Unknown) => return Failure::Unknown,
        None => {}
    }
    if let Some(f) = transport_failure(s) {
        return f;
    }
    match s.code() {
        // A master that answered Unavailable without saying what it did (stopping, an older
        // master), or a call cancelled or past its deadline on the way: it may have acted.
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => Failure::Unknown,
        _ => Failure::Final,
    }
}

/// A status tonic made from a transport failure keeps that failure as its source. A stream the
/// master refused (HTTP/2 REFUSED_STREAM) was not processed; any other broken connection (reset,
/// broken pipe, end of stream, HTTP/2 or hyper error) may have carried the request.
fn transport_failure(s: &Status) -> Option<Failure> {
    let mut cause: Option<&(dyn StdError + 'static)> = StdError::source(s);
    let mut transport = false;
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Some(Failure::NotApplied);
            }
            transport = true;
        } else if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            transport |= matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut | NotConnected
            );
        } else if e.is::<hyper::Error>() || e.is::<tonic::transport::Error>() {
            transport = true;
        }
        cause = e.source();
    }
    transport.then_some(Failure::Unknown)
}

/// What `call` does after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Move on to another master (or the hinted leader).
    Retry,
    /// Stop: the write may or may not have been applied.
    OutcomeUnknown,
    /// Stop with the master's answer.
    Fail,
}

fn next_step(call: Call, failure: Failure) -> Next {
    match (failure, call) {
        (Failure::Final, _) => Next::Fail,
        (Failure::NotApplied, _) | (Failure::Unknown, Call::Idempotent) => Next::Retry,
        (Failure::Unknown, Call::Once) => Next::OutcomeUnknown,
    }
}

/// A write whose outcome is unknown. `main` exits with status 3 for it.
#[derive(Debug)]
pub struct OutcomeUnknown(pub String);

impl fmt::Display for OutcomeUnknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for OutcomeUnknown {}

/// `s` as an error for the user: an unknown outcome says so, and `next` what to do about it (how
/// to see whether the write happened); anything else stays the status.
pub fn explain(s: Status, next: &str) -> anyhow::Error {
    if berth_api::outcome(&s) == Some(berth_api::Outcome::Unknown) {
        return OutcomeUnknown(format!("{}; {next}", s.message())).into();
    }
    s.into()
}

/// The status `call` returns for a non-idempotent write whose answer was lost.
fn unknown_outcome(endpoint: &str, s: &Status) -> Status {
    let msg = format!(
        "outcome unknown: the write may or may not have been applied (master {endpoint}: {})",
        detail(s).trim_end_matches('.')
    );
    berth_api::with_outcome(Status::new(s.code(), msg), berth_api::Outcome::Unknown)
}

/// A failed attempt.
struct Failed {
    failure: Failure,
    status: Status,
    /// Worth a note on stderr when moving on (it cost time, or the request is sent again).
    notable: bool,
}

pub struct Client {
    endpoints: Vec<String>,
    tls: ClientTlsConfig,
    /// Index into `endpoints` of the last endpoint that answered.
    preferred: Mutex<usize>,
    /// How long to keep trying other masters, in all.
    pub patience: Duration,
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
}

/// A status's message and, for one tonic made from a transport failure, its causes (its message
/// alone is often just "transport error").
fn detail(s: &Status) -> String {
    match StdError::source(s) {
        Some(cause) => {
            let causes = chain(cause);
            if causes.starts_with(s.message()) {
                causes
            } else if s.message().contains(&causes) {
                s.message().to_string()
            } else {
                format!("{}: {causes}", s.message())
            }
        }
        None => s.message().to_string(),
    }
}

/// `e` and its causes, `a: b: c`.
/// A refusal in the TLS handshake is final: another try, or another master, gets the same
/// answer. Each one says what is wrong with which certificate and what to do.
fn tls_refusal(text: &str) -> Option<Status> {
    let why = if text.contains("CertificateRevoked") {
        "the masters refused this client's certificate: it was revoked (`berth cert revoked` lists the \
         revocations); ask an administrator for a new one"
    } else if text.contains("UnknownCA") || text.contains("BadCertificate") {
        "the masters do not accept this client's certificate: it is not from a CA they trust (a CA rotation \
         retired its CA, or it belongs to another cluster); ask an administrator for a new one (`berth user add \
         NAME --renew`)"
    } else if text.contains("UnknownIssuer") {
        "this client does not trust the masters' certificate: its CA file is not the cluster's CA (after `berth \
         ca rotate`, use the ca.crt it wrote)"
    } else {
        return None;
    };
    Some(Status::unauthenticated(format!("{why} (TLS: {text})")))
}

fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cause = c.source();
    }
    s
}

impl Client {
    pub fn new(endpoints: Vec<String>, tls: ClientTlsConfig) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(anyhow!(
                "no master endpoints: pass --endpoints HOST:PORT,..., set BERTH_ENDPOINTS, or point \
                 --config/BERTH_CONFIG at the berth.toml that `berth dev` writes"
            ));
        }
        Ok(Client {
            endpoints,
            tls,
            preferred: Mutex::new(0),
            patience: Duration::from_secs(10),
            connect_timeout: CONNECT_TIMEOUT,
            attempt_timeout: ATTEMPT_TIMEOUT,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn endpoint(&self, endpoint: &str) -> Result<Endpoint> {
        let host = endpoint.split_once("://").map_or(endpoint, |(_, h)| h);
        Ok(Channel::from_shared(format!("https://{host}"))
            .with_context(|| format!("{endpoint:?} is not a valid endpoint (expected HOST:PORT)"))?
            .tls_config(self.tls.clone())
            .context("TLS configuration")?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true))
    }

    /// A lazily connecting channel, for benchmarks that drive one master directly. Its
    /// connection and requests have no deadline: commands go through [`Client::call`].
    pub fn channel(&self, endpoint: &str) -> Result<Conn> {
        Ok(InterceptedService::new(self.endpoint(endpoint)?.connect_lazy(), Deadline(None)))
    }

    /// A connected channel, within the connect timeout. Nothing has been sent when this fails.
    async fn connect(&self, endpoint: &str) -> Result<Conn, Failed> {
        let ep = self.endpoint(endpoint).map_err(|e| Failed {
            failure: Failure::Final,
            status: Status::invalid_argument(format!("{e:#}")),
            notable: false,
        })?;
        match tokio::time::timeout(self.connect_timeout, ep.connect()).await {
            Ok(Ok(ch)) => Ok(InterceptedService::new(ch, Deadline(Some(self.attempt_timeout)))),
            Ok(Err(e)) => {
                let text = chain(&e);
                Err(match tls_refusal(&text) {
                    Some(status) => Failed { failure: Failure::Final, status, notable: false },
                    None => Failed {
                        failure: Failure::NotApplied,
                        status: Status::unavailable(format!("cannot connect: {text}")),
                        notable: false,
                    },
                })
            }
            Err(_) => Err(Failed {
                failure: Failure::NotApplied,
                status: Status::unavailable(format!(
                    "no TLS handshake within {:?} (frozen or overloaded?)",
                    self.connect_timeout
                )),
                notable: true,
            }),
        }
    }

    async fn attempt<T, F, Fut>(&self, endpoint: &str, f: &F) -> Result<T, Failed>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let ch = self.connect(endpoint).await?;
        match tokio::time::timeout(self.attempt_timeout, f(ch)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(status)) => {
                if let Some(refused) = tls_refusal(&detail(&status)) {
                    // The server refused the certificate before it read the request.
                    return Err(Failed { failure: Failure::Final, status: refused, notable: false });
                }
                let failure = classify(&status);
                Err(Failed { failure, notable: failure == Failure::Unknown, status })
            }
            Err(_) => Err(Failed {
                failure: Failure::Unknown,
                status: Status::deadline_exceeded(format!("no answer within {:?}", self.attempt_timeout)),
                notable: true,
            }),
        }
    }

    pub fn kv(ch: Conn) -> KvClient<Conn> {
        KvClient::new(ch).max_decoding_message_size(MESSAGE_LIMIT).max_encoding_message_size(MESSAGE_LIMIT)
    }

    pub fn cluster(ch: Conn) -> ClusterClient<Conn> {
        ClusterClient::new(ch).max_decoding_message_size(MESSAGE_LIMIT).max_encoding_message_size(MESSAGE_LIMIT)
    }

    pub fn access(ch: Conn) -> berth_api::pb::access_client::AccessClient<Conn> {
        berth_api::pb::access_client::AccessClient::new(ch).max_decoding_message_size(MESSAGE_LIMIT)
    }

    pub fn nodes(ch: Conn) -> NodesClient<Conn> {
        NodesClient::new(ch).max_decoding_message_size(64 << 20)
    }

    pub fn control(ch: Conn) -> berth_api::pb::control_service_client::ControlServiceClient<Conn> {
        berth_api::pb::control_service_client::ControlServiceClient::new(ch)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(MESSAGE_LIMIT)
    }

    /// Runs `f` against the masters until one answers (see the module doc for when it moves on).
    /// A not-leader answer moves to the hinted leader; after every master failed in a row it
    /// backs off, for up to `patience` in all. A non-idempotent call whose answer was lost
    /// returns a status marked outcome unknown (see [`explain`]).
    pub async fn call<T, F, Fut>(&self, call: Call, f: F) -> Result<T, Status>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.patience;
        let n = self.endpoints.len();
        let mut next = *self.preferred.lock().expect("lock");
        let mut hint: Option<String> = None;
        let mut backoff = Duration::from_millis(50);
        let mut failed_in_row = 0;
        loop {
            let (endpoint, idx) = match hint.take() {
                Some(h) => {
                    let idx = self.endpoints.iter().position(|e| *e == h);
                    (h, idx)
                }
                None => (self.endpoints[next % n].clone(), Some(next % n)),
            };
            let Failed { failure, status, notable } = match self.attempt(&endpoint, &f).await {
                Ok(v) => {
                    if let Some(i) = idx {
                        *self.preferred.lock().expect("lock") = i;
                    }
                    return Ok(v);
                }
                Err(failed) => failed,
            };
            match next_step(call, failure) {
                Next::Fail => return Err(status),
                Next::OutcomeUnknown => return Err(unknown_outcome(&endpoint, &status)),
                Next::Retry => {}
            }
            if Instant::now() >= deadline {
                return Err(gave_up(status, failure, &self.endpoints, self.patience));
            }
            if let Some(h) = berth_api::leader_hint(&status).filter(|h| *h != endpoint) {
                hint = Some(h);
                continue;
            }
            if notable && n > 1 {
                let again =
                    if failure == Failure::Unknown { ", sending the request again (it is idempotent)" } else { "" };
                eprintln!("note: master {endpoint}: {}; trying another master{again}", detail(&status));
            }
            next += 1;
            failed_in_row += 1;
            if failed_in_row >= n {
                failed_in_row = 0;
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// The error once `patience` has run out.
fn gave_up(s: Status, failure: Failure, endpoints: &[String], patience: Duration) -> Status {
    let servers = endpoints.join(",");
    match failure {
        // A master's own "not applied" answer (no leader) says more than a summary.
        Failure::NotApplied if berth_api::outcome(&s).is_some() => s,
        Failure::NotApplied => Status::unavailable(format!(
            "no master answered at {servers} within {patience:?}: {}. Are the masters running? (`berth dev` \
             starts a local cluster)",
            detail(&s)
        )),
        _ => Status::new(
            s.code(),
            format!(
                "no master answered at {servers} within {patience:?} (last: {}); the request may have been \
                 applied, and running it again is safe",
                detail(&s)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn with_source(mut s: Status, e: impl StdError + Send + Sync + 'static) -> Status {
        s.set_source(Arc::new(e));
        s
    }

    #[test]
    fn statuses_are_classified_by_type_not_text() {
        use std::io::{Error, ErrorKind};
        // What the masters say they did.
        assert_eq!(classify(&berth_api::not_leader(Some((2, "127.0.0.1:1")))), Failure::NotApplied);
        assert_eq!(classify(&berth_api::not_applied("no live leader")), Failure::NotApplied);
        assert_eq!(classify(&berth_api::outcome_unknown("the forward broke")), Failure::Unknown);
        // A connection reset after the request left (a master killed mid-call).
        let reset =
            with_source(Status::unavailable("Connection reset by peer"), Error::from(ErrorKind::ConnectionReset));
        assert_eq!(classify(&reset), Failure::Unknown);
        let eof = with_source(Status::unknown("x"), Error::from(ErrorKind::UnexpectedEof));
        assert_eq!(classify(&eof), Failure::Unknown);
        // Found deeper in the chain too.
        #[derive(Debug)]
        struct Wrap(Error);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl StdError for Wrap {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let deep = with_source(Status::unknown("transport error"), Wrap(Error::from(ErrorKind::BrokenPipe)));
        assert_eq!(classify(&deep), Failure::Unknown);
        // HTTP/2: a refused stream was not processed; any other error may have carried it.
        let refused = with_source(Status::unavailable("h2"), h2::Error::from(h2::Reason::REFUSED_STREAM));
        assert_eq!(classify(&refused), Failure::NotApplied);
        let h2_other = with_source(Status::unknown("h2"), h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert_eq!(classify(&h2_other), Failure::Unknown);
        // Text means nothing: a message that looks like a transport error is still final.
        assert_eq!(classify(&Status::unknown("transport error: connect")), Failure::Final);
        assert_eq!(classify(&Status::not_found("no service web")), Failure::Final);
        assert_eq!(classify(&Status::invalid_argument("bad")), Failure::Final);
        assert_eq!(classify(&Status::failed_precondition("no")), Failure::Final);
        // An unmarked Unavailable (a stopping or older master) or a cancelled call may have acted.
        assert_eq!(classify(&Status::unavailable("master is stopping")), Failure::Unknown);
        assert_eq!(classify(&Status::cancelled("Timeout expired")), Failure::Unknown);
        assert_eq!(classify(&Status::deadline_exceeded("late")), Failure::Unknown);
        assert_eq!(detail(&deep), "transport error: broken pipe");
        assert_eq!(detail(&reset), "Connection reset by peer: connection reset");
        // An unrelated I/O error in the chain is not a broken connection.
        let local = with_source(Status::unknown("x"), Error::from(ErrorKind::NotFound));
        assert_eq!(classify(&local), Failure::Final);
    }

    #[test]
    fn only_idempotent_calls_are_sent_again_after_a_lost_answer() {
        assert_eq!(next_step(Call::Idempotent, Failure::NotApplied), Next::Retry);
        assert_eq!(next_step(Call::Once, Failure::NotApplied), Next::Retry);
        assert_eq!(next_step(Call::Idempotent, Failure::Unknown), Next::Retry);
        assert_eq!(next_step(Call::Once, Failure::Unknown), Next::OutcomeUnknown);
        assert_eq!(next_step(Call::Idempotent, Failure::Final), Next::Fail);
        assert_eq!(next_step(Call::Once, Failure::Final), Next::Fail);
    }

    #[test]
    fn an_unknown_outcome_is_said_plainly() {
        let s = unknown_outcome("127.0.0.1:7001", &Status::deadline_exceeded("no answer within 5s"));
        assert_eq!(berth_api::outcome(&s), Some(berth_api::Outcome::Unknown));
        let e = explain(s, "check with `berth kv get k` before writing again");
        let u = e.downcast_ref::<OutcomeUnknown>().expect("an OutcomeUnknown");
        assert!(u.0.starts_with("outcome unknown: the write may or may not have been applied"), "{}", u.0);
        assert!(u.0.contains("127.0.0.1:7001") && u.0.contains("`berth kv get k`"), "{}", u.0);
        // Other errors stay statuses.
        assert!(explain(Status::not_found("x"), "c").downcast_ref::<Status>().is_some());
    }

    /// A listener that never accepts: the kernel completes TCP handshakes, nobody answers TLS,
    /// as with a SIGSTOPped master.
    fn frozen() -> (std::net::TcpListener, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = l.local_addr().unwrap().to_string();
        (l, ep)
    }

    #[tokio::test]
    async fn a_frozen_master_costs_one_connect_timeout_and_sends_nothing() {
        berth_pki::tls::install_crypto_provider();
        let (_a, ea) = frozen();
        let (_b, eb) = frozen();
        let mut c = Client::new(vec![ea.clone(), eb.clone()], ClientTlsConfig::new()).unwrap();
        c.connect_timeout = Duration::from_millis(100);
        c.patience = Duration::from_millis(150);
        let calls = AtomicUsize::new(0);
        let started = std::time::Instant::now();
        let r: Result<(), Status> = c
            .call(Call::Once, |_ch| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            })
            .await;
        let s = r.expect_err("nothing answers");
        // Both masters tried, nothing sent, so no "outcome unknown" for this write.
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(berth_api::outcome(&s), None);
        assert!(s.message().contains("TLS handshake"), "{}", s.message());
        assert!(s.message().contains(&ea) && s.message().contains(&eb), "{}", s.message());
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
