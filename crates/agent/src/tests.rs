//! In-process tests against a minimal test master (a test double written here; the real master
//! lives in `berth-master` and is covered by the workspace's process-level tests).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_api::pb::agent::{
    Accepted, AgentFrame, Assignment, Assignments, AssignmentsKind, CertificateRenewed, HeartbeatAck, Hello,
    JoinAccepted, JoinError, JoinRejected, MasterFrame, Redirect, TaskState, agent_frame, master_frame,
};
use berth_channel::{ALPN, FrameReader, FrameWriter, close};
use berth_pki::tls::TlsFiles;
use berth_pki::{CertificateAuthority, Identity, JoinToken};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

const HOUR: Duration = Duration::from_secs(3600);
/// Upper bound for any condition a test waits on.
const DEADLINE: Duration = Duration::from_secs(30);

struct Cluster {
    ca: CertificateAuthority,
    token: JoinToken,
}

fn cluster() -> Cluster {
    berth_pki::tls::install_crypto_provider();
    let ca = CertificateAuthority::generate("test").unwrap();
    let token = JoinToken::generate(ca.digest());
    Cluster { ca, token }
}

#[derive(Clone)]
enum JoinReply {
    Accept,
    Reject(JoinError, &'static str),
    NotLeader(String),
}

#[derive(Clone)]
struct Knobs {
    join: JoinReply,
    term: u64,
    /// Validity of certificates signed at join.
    join_validity: Duration,
    /// Answer Hello with Redirect to this leader.
    redirect: Option<String>,
    /// Masters to announce (default: this one).
    masters: Vec<String>,
    /// This master's raft id (its certificate's identity).
    master_id: u64,
    /// Masters it says were removed.
    removed: Vec<u64>,
    /// The revocation list it sends in Accepted.
    revoked: Option<berth_api::pb::agent::Revocations>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            join: JoinReply::Accept,
            term: 5,
            join_validity: HOUR,
            redirect: None,
            masters: vec![],
            master_id: 1,
            removed: vec![],
            revoked: None,
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    JoinSeen { name: String },
    Joined,
    Hello(Hello),
    Frame { node_id: String, body: agent_frame::Body },
    Renewed,
    SessionEnded,
}

enum Ctrl {
    Frame(MasterFrame),
    Close(quinn::VarInt, String),
    Raw(Vec<u8>),
}

struct Shared {
    ca: CertificateAuthority,
    addr: String,
    knobs: Mutex<Knobs>,
    events: mpsc::UnboundedSender<Event>,
    sessions: Mutex<HashMap<String, mpsc::UnboundedSender<Ctrl>>>,
    next_node: Mutex<u32>,
}

struct TestMaster {
    addr: String,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    seen: Vec<Event>,
    endpoint: quinn::Endpoint,
    task: JoinHandle<()>,
}

impl Drop for TestMaster {
    fn drop(&mut self) {
        self.endpoint.close(close::SHUTDOWN, b"test over");
        self.task.abort();
    }
}

impl TestMaster {
    async fn start(cluster: &Cluster, knobs: Knobs) -> TestMaster {
        let id = Identity::master(knobs.master_id);
        let files = TlsFiles::new(cluster.ca.cert_pem(), cluster.ca.issue(&id, &[], &[], HOUR).unwrap());
        let tls = berth_pki::tls::server_config_client_auth_optional(&files, &[ALPN]).unwrap();
        let endpoint = berth_channel::server_endpoint("127.0.0.1:0".parse().unwrap(), tls).unwrap();
        let addr = endpoint.local_addr().unwrap().to_string();
        let (tx, events) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            ca: cluster.ca.clone(),
            addr: addr.clone(),
            knobs: Mutex::new(knobs),
            events: tx,
            sessions: Mutex::new(HashMap::new()),
            next_node: Mutex::new(0),
        });
        let ep = endpoint.clone();
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let sh = sh.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve(conn, sh).await;
                    }
                });
            }
        });
        TestMaster { addr, shared, events, seen: Vec::new(), endpoint, task }
    }

    fn set(&self, f: impl FnOnce(&mut Knobs)) {
        f(&mut self.shared.knobs.lock().unwrap());
    }

    /// Waits (at most [`DEADLINE`]) for an event `f` picks; every event is kept in `seen`.
    async fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; seen: {:#?}", self.seen))
                .expect("the test master stopped");
            self.seen.push(event.clone());
            if let Some(t) = f(&event) {
                return t;
            }
        }
    }

    async fn hello(&mut self) -> Hello {
        self.wait_for("Hello", |e| match e {
            Event::Hello(hello) => Some(hello.clone()),
            _ => None,
        })
        .await
    }

    fn ctrl(&self, node_id: &str, c: Ctrl) {
        let sessions = self.shared.sessions.lock().unwrap();
        sessions.get(node_id).expect("no session for this node").send(c).unwrap_or_else(|_| panic!("session gone"));
    }

    fn send(&self, node_id: &str, body: master_frame::Body) {
        self.ctrl(node_id, Ctrl::Frame(MasterFrame { body: Some(body) }));
    }

    /// Every event seen so far plus those already queued.
    fn drain(&mut self) -> &[Event] {
        while let Ok(e) = self.events.try_recv() {
            self.seen.push(e);
        }
        &self.seen
    }
}

async fn serve(conn: quinn::Connection, sh: Arc<Shared>) {
    let Ok((send, recv)) = conn.accept_bi().await else { return };
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv);
    let Ok(Some(first)) = r.recv::<AgentFrame>().await else { return };
    let knobs = sh.knobs.lock().unwrap().clone();
    let masters = if knobs.masters.is_empty() { vec![sh.addr.clone()] } else { knobs.masters.clone() };
    match first.body {
        Some(agent_frame::Body::Join(req)) => {
            sh.events.send(Event::JoinSeen { name: req.name.clone() }).ok();
            assert!(channel_peer_is_anonymous(&conn), "a joining agent presents no certificate");
            let reply = match knobs.join {
                JoinReply::Accept => {
                    let node_id = {
                        let mut n = sh.next_node.lock().unwrap();
                        *n += 1;
                        format!("node-{n}")
                    };
                    let cert_pem =
                        sh.ca.sign_csr(&req.csr_pem, &Identity::agent(&node_id), knobs.join_validity).unwrap();
                    sh.events.send(Event::Joined).ok();
                    master_frame::Body::JoinAccepted(JoinAccepted {
                        node_id,
                        cert_pem,
                        ca_pem: sh.ca.cert_pem().to_string(),
                        masters,
                    })
                }
                JoinReply::Reject(error, message) => master_frame::Body::JoinRejected(JoinRejected {
                    error: error as i32,
                    message: message.to_string(),
                    leader_hint: String::new(),
                }),
                JoinReply::NotLeader(hint) => master_frame::Body::JoinRejected(JoinRejected {
                    error: JoinError::NotLeader as i32,
                    message: "not the leader".to_string(),
                    leader_hint: hint,
                }),
            };
            w.send(&MasterFrame { body: Some(reply) }).await.ok();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        }
        Some(agent_frame::Body::Hello(hello)) => {
            let node_id = hello.node_id.clone();
            if berth_channel::peer_identity(&conn) != Some(Identity::agent(&node_id)) {
                conn.close(close::UNAUTHENTICATED, b"certificate does not match the node id");
                return;
            }
            if let Some(leader) = knobs.redirect {
                w.send(&MasterFrame { body: Some(master_frame::Body::Redirect(Redirect { leader, masters })) })
                    .await
                    .ok();
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
                return;
            }
            let accepted = Accepted {
                term: knobs.term,
                heartbeat_interval_ms: 100,
                masters,
                removed_masters: knobs.removed.clone(),
                revoked: knobs.revoked.clone(),
            };
            if w.send(&MasterFrame { body: Some(master_frame::Body::Accepted(accepted)) }).await.is_err() {
                return;
            }
            let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel();
            sh.sessions.lock().unwrap().insert(node_id.clone(), ctrl_tx);
            sh.events.send(Event::Hello(hello)).ok();
            // Reads in their own task: FrameReader::recv is not cancel-safe.
            let (in_tx, mut in_rx) = mpsc::unbounded_channel();
            let reader = tokio::spawn(async move {
                while let Ok(Some(f)) = r.recv::<AgentFrame>().await {
                    if in_tx.send(f).is_err() {
                        break;
                    }
                }
            });
            loop {
                tokio::select! {
                    f = in_rx.recv() => {
                        let Some(AgentFrame { body: Some(body) }) = f else { break };
                        match &body {
                            agent_frame::Body::Heartbeat(hb) => {
                                sh.events.send(Event::Frame { node_id: node_id.clone(), body: body.clone() }).ok();
                                let ack = HeartbeatAck {
                                    seq: hb.seq,
                                    term: knobs.term,
                                    removed_masters: knobs.removed.clone(),
                                    ..Default::default()
                                };
                                let body = master_frame::Body::HeartbeatAck(ack);
                                if w.send(&MasterFrame { body: Some(body) }).await.is_err() {
                                    break;
                                }
                            }
                            agent_frame::Body::Renew(req) => {
                                let cert_pem = sh.ca.sign_csr(&req.csr_pem, &Identity::agent(&node_id), HOUR).unwrap();
                                let body = master_frame::Body::Renewed(CertificateRenewed {
                                    cert_pem,
                                    ca_pem: sh.ca.cert_pem().to_string(),
                                });
                                if w.send(&MasterFrame { body: Some(body) }).await.is_err() {
                                    break;
                                }
                                sh.events.send(Event::Renewed).ok();
                            }
                            _ => {
                                sh.events.send(Event::Frame { node_id: node_id.clone(), body }).ok();
                            }
                        }
                    }
                    c = ctrl_rx.recv() => match c {
                        Some(Ctrl::Frame(f)) => { if w.send(&f).await.is_err() { break; } }
                        Some(Ctrl::Close(code, reason)) => { conn.close(code, reason.as_bytes()); break; }
                        Some(Ctrl::Raw(bytes)) => { if w.get_mut().write_all(&bytes).await.is_err() { break; } }
                        None => break,
                    },
                }
            }
            reader.abort();
            sh.sessions.lock().unwrap().remove(&node_id);
            sh.events.send(Event::SessionEnded).ok();
        }
        _ => conn.close(close::MALFORMED_FRAME, b"expected Join or Hello"),
    }
}

fn channel_peer_is_anonymous(conn: &quinn::Connection) -> bool {
    berth_channel::peer_identity(conn).is_none()
}

struct RunningAgent {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    async fn stop(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task).await.expect("agent did not stop").expect("agent panicked")
    }
}

fn config(master: &TestMaster, token: Option<String>, dir: &Path) -> AgentConfig {
    AgentConfig {
        join: vec![master.addr.clone()],
        token,
        data_dir: dir.to_path_buf(),
        name: Some("n1".into()),
        labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
        advertise_addr: Some("127.0.0.1".parse().unwrap()),
        simulate: None,
        cluster_domain: None,
        simulate_networks: false,
        allow_host_paths: Vec::new(),
        allow_privileged: false,
        oci_runtime: None,
        insecure_registries: Vec::new(),
        image_gc_threshold: None,
        edge: Default::default(),
        metrics_listen: None,
    }
}

/// Starts one agent with the simulated driver (so assigned tasks report RUNNING).
fn spawn_agent(cfg: AgentConfig) -> RunningAgent {
    let shutdown = CancellationToken::new();
    let (sink, statuses) = status_channel();
    let task = tokio::spawn(run_with_driver(cfg, SimulatedDriver::new(sink), statuses, shutdown.clone()));
    RunningAgent { shutdown, task }
}

async fn run_to_end(cfg: AgentConfig) -> Result<(), AgentError> {
    let agent = spawn_agent(cfg);
    tokio::time::timeout(DEADLINE, agent.task).await.expect("the agent did not give up").unwrap()
}

fn dir_entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => vec![],
    }
}

fn assignment(id: &str, desired: TaskState) -> Assignment {
    Assignment {
        task_id: id.into(),
        spec: id.as_bytes().to_vec(),
        desired_state: desired as i32,
        files: vec![],
        image: None,
    }
}

fn assignments(
    term: u64,
    kind: AssignmentsKind,
    base: u64,
    version: u64,
    updated: Vec<Assignment>,
    removed: &[&str],
) -> master_frame::Body {
    master_frame::Body::Assignments(Assignments {
        term,
        kind: kind as i32,
        version,
        base_version: base,
        updated,
        removed: removed.iter().map(|s| s.to_string()).collect(),
    })
}

/// Waits for a StatusReport that says `task` is in `state`.
async fn wait_status(master: &mut TestMaster, task: &str, state: TaskState) {
    wait_statuses(master, &[(task, state)]).await
}

/// Waits until StatusReports (one or several) have said every `(task, state)`.
async fn wait_statuses(master: &mut TestMaster, want: &[(&str, TaskState)]) {
    let mut missing: Vec<(String, i32)> = want.iter().map(|(t, s)| (t.to_string(), *s as i32)).collect();
    master
        .wait_for(&format!("statuses {want:?}"), |e| {
            if let Event::Frame { body: agent_frame::Body::Status(r), .. } = e {
                missing.retain(|(task, state)| !r.tasks.iter().any(|t| t.task_id == *task && t.state == *state));
            }
            missing.is_empty().then_some(())
        })
        .await
}

#[tokio::test]
async fn join_writes_files_then_restart_without_token_says_hello_as_the_same_node() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");

    let agent = spawn_agent(config(&master, Some(cl.token.encode()), &dir));
    let hello = master.hello().await;
    assert_eq!(hello.node_id, "node-1");
    assert_eq!(hello.highest_term, 0);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    let res = hello.resources.unwrap();
    assert!(res.cpu_millis >= 1000 && res.memory_bytes > 0 && res.disk_bytes > 0, "{res:?}");

    let mut files = dir_entries(&dir);
    files.sort();
    assert_eq!(files, [STATE_FILE, CA_FILE, CERT_FILE, KEY_FILE]);
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    assert_eq!(std::fs::read_to_string(dir.join(CA_FILE)).unwrap(), cl.ca.cert_pem());
    let state = AgentState::load(&dir).unwrap().unwrap();
    assert_eq!(state.node_id, "node-1");
    assert_eq!(state.name, "n1");
    assert_eq!(state.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(state.masters, vec![master.addr.clone()]);
    // Accepted is persisted: term and leader.
    tokio::time::timeout(DEADLINE, async {
        loop {
            let s = AgentState::load(&dir).unwrap().unwrap();
            if s.highest_term == 5 && s.last_leader.as_deref() == Some(master.addr.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Accepted was not persisted");
    // Heartbeats flow.
    master
        .wait_for("a heartbeat", |e| {
            matches!(e, Event::Frame { body: agent_frame::Body::Heartbeat(_), .. }).then_some(())
        })
        .await;
    agent.stop().await.unwrap();
    master.wait_for("the session to end", |e| matches!(e, Event::SessionEnded).then_some(())).await;

    // Restart without a token.
    let agent = spawn_agent(config(&master, None, &dir));
    let hello = master.hello().await;
    assert_eq!(hello.node_id, "node-1");
    assert_eq!(hello.highest_term, 5);
    agent.stop().await.unwrap();
    let joins = master.drain().iter().filter(|e| matches!(e, Event::JoinSeen { .. })).count();
    assert_eq!(joins, 1, "the restart must not join again");

    // A token passed on restart is ignored.
    let agent = spawn_agent(config(&master, Some("BERTH-garbage".into()), &dir));
    assert_eq!(master.hello().await.node_id, "node-1");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn first_start_needs_a_token_and_a_well_formed_one() {
    let cl = cluster();
    let master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let err = run_to_end(config(&master, None, tmp.path())).await.unwrap_err();
    assert!(matches!(err, AgentError::NoState { .. }), "{err}");
    assert!(err.to_string().ends_with(": pass --token to join"), "{err}");

    let err = run_to_end(config(&master, Some("not-a-token".into()), tmp.path())).await.unwrap_err();
    assert!(matches!(err, AgentError::BadToken(_)), "{err}");
    assert!(dir_entries(tmp.path()).is_empty());
}

#[tokio::test]
async fn rejections_leave_the_data_dir_empty_and_say_why() {
    let cl = cluster();
    let master = TestMaster::start(&cl, Knobs::default()).await;
    type Case = (JoinError, fn(&AgentError) -> bool, &'static str);
    let cases: [Case; 6] = [
        (
            JoinError::TokenExpired,
            |e| matches!(e, AgentError::TokenExpired { .. }),
            "the token has expired; create a new one with `berth token create`",
        ),
        (JoinError::TokenRevoked, |e| matches!(e, AgentError::TokenRevoked { .. }), "was revoked"),
        (JoinError::TokenUsedUp, |e| matches!(e, AgentError::TokenUsedUp { .. }), "as many times as it allows"),
        (JoinError::TokenInvalid, |e| matches!(e, AgentError::TokenInvalid { .. }), "not valid"),
        (JoinError::NameTaken, |e| matches!(e, AgentError::NameTaken { .. }), "already named \"n1\""),
        (JoinError::BadRequest, |e| matches!(e, AgentError::BadRequest { .. }), "malformed"),
    ];
    for (code, is, text) in cases {
        master.set(|k| k.join = JoinReply::Reject(code, "master says no"));
        let tmp = tempfile::tempdir().unwrap();
        let err = run_to_end(config(&master, Some(cl.token.encode()), tmp.path())).await.unwrap_err();
        assert!(is(&err), "{code:?}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(text) && msg.contains("master says no"), "{code:?}: {msg}");
        assert!(!msg.contains(&cl.token.secret), "the secret leaked: {msg}");
        assert!(dir_entries(tmp.path()).is_empty(), "{code:?} left {:?}", dir_entries(tmp.path()));
        // A data dir that does not exist yet is not created.
        let missing = tmp.path().join("missing");
        run_to_end(config(&master, Some(cl.token.encode()), &missing)).await.unwrap_err();
        assert!(!missing.exists());
    }
}

#[tokio::test]
async fn wrong_ca_digest_fails_before_anything_is_sent() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let other = CertificateAuthority::generate("other").unwrap();
    let token = JoinToken { ca_digest: other.digest(), ..cl.token.clone() };
    let tmp = tempfile::tempdir().unwrap();
    let err = run_to_end(config(&master, Some(token.encode()), tmp.path())).await.unwrap_err();
    assert!(matches!(err, AgentError::CaMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("the master's CA does not match the digest in the token: wrong cluster or tampered token"),
        "{err}"
    );
    assert!(dir_entries(tmp.path()).is_empty());
    assert!(
        !master.drain().iter().any(|e| matches!(e, Event::JoinSeen { .. })),
        "the join request must not reach an unverified master"
    );
}

#[tokio::test]
async fn join_follows_the_leader_hint() {
    let cl = cluster();
    let mut leader = TestMaster::start(&cl, Knobs::default()).await;
    let follower = TestMaster::start(&cl, Knobs::default()).await;
    follower.set(|k| k.join = JoinReply::NotLeader(leader.addr.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let agent = spawn_agent(config(&follower, Some(cl.token.encode()), tmp.path()));
    assert_eq!(leader.hello().await.node_id, "node-1");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn sessions_follow_redirects_and_not_leader_closes() {
    let cl = cluster();
    let mut a = TestMaster::start(&cl, Knobs::default()).await;
    let mut b = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = spawn_agent(config(&a, Some(cl.token.encode()), tmp.path()));
    let node = a.hello().await.node_id;

    // The leader steps down: NOT_LEADER with a hint sends the agent to b at once.
    a.set(|k| k.redirect = Some(b.addr.clone()));
    a.ctrl(&node, Ctrl::Close(close::NOT_LEADER, b.addr.clone()));
    assert_eq!(b.hello().await.node_id, node);

    // b steps down without closing politely; a (a follower now) redirects back to b, which
    // accepts again.
    b.ctrl(&node, Ctrl::Close(close::SUPERSEDED, String::new()));
    let hello = b.hello().await;
    assert_eq!(hello.node_id, node);
    agent.stop().await.unwrap();
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert_eq!(state.last_leader.as_deref(), Some(b.addr.as_str()));
}

#[tokio::test]
async fn assignments_from_an_older_term_are_refused() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = spawn_agent(config(&master, Some(cl.token.encode()), tmp.path()));
    let node = master.hello().await.node_id;

    use AssignmentsKind::*;
    master.send(&node, assignments(4, Complete, 0, 1, vec![assignment("old", TaskState::Running)], &[]));
    master.send(&node, assignments(5, Complete, 0, 2, vec![assignment("new", TaskState::Running)], &[]));
    wait_status(&mut master, "new", TaskState::Running).await;
    let mentions_old = |events: &[Event]| {
        events.iter().any(|e| match e {
            Event::Frame { body: agent_frame::Body::Status(r), .. } => r.tasks.iter().any(|t| t.task_id == "old"),
            _ => false,
        })
    };
    assert!(!mentions_old(master.drain()));
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert_eq!(state.assignments_version, 2);
    assert_eq!(state.assignments.keys().collect::<Vec<_>>(), ["new"]);

    // A newer term is taken (and persisted); then the previous term is refused too.
    master.send(&node, assignments(6, Incremental, 2, 3, vec![assignment("t6", TaskState::Running)], &[]));
    wait_status(&mut master, "t6", TaskState::Running).await;
    master.send(&node, assignments(5, Incremental, 3, 4, vec![assignment("stale", TaskState::Running)], &[]));
    master.send(&node, assignments(6, Incremental, 3, 4, vec![assignment("t6b", TaskState::Running)], &[]));
    wait_status(&mut master, "t6b", TaskState::Running).await;
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert_eq!(state.highest_term, 6);
    assert_eq!(state.assignments_version, 4);
    assert!(!state.assignments.contains_key("stale"));
    agent.stop().await.unwrap();
    assert!(!master.drain().iter().any(|e| match e {
        Event::Frame { body: agent_frame::Body::Status(r), .. } => r.tasks.iter().any(|t| t.task_id == "stale"),
        _ => false,
    }));

    // Fencing at session level: a master with an older term than seen is refused.
    master.set(|k| k.term = 5);
    let agent = spawn_agent(config(&master, None, tmp.path()));
    let hello = master.hello().await;
    assert_eq!(hello.highest_term, 6);
    master.wait_for("the fenced session to end", |e| matches!(e, Event::SessionEnded).then_some(())).await;
    agent.stop().await.unwrap();
}

// Hole 8: a removed (or rogue) master that gave the agent a term of u64::MAX does not fence the
// real leader off: the leader's session names it as removed, the agent drops the term it gave
// and refuses that master from then on. Without this, the agent refused every real leader.
#[tokio::test]
async fn a_term_from_a_removed_master_is_dropped_and_the_master_refused() {
    let cl = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let rogue_knobs = || Knobs { term: u64::MAX, master_id: 4, ..Knobs::default() };
    let mut rogue = TestMaster::start(&cl, rogue_knobs()).await;
    let agent = spawn_agent(config(&rogue, Some(cl.token.encode()), tmp.path()));
    rogue.hello().await;
    rogue.wait_for("a heartbeat to the rogue", |e| matches!(e, Event::Frame { .. }).then_some(())).await;
    agent.stop().await.unwrap();
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert_eq!((state.highest_term, state.highest_term_from), (u64::MAX, Some(4)));
    drop(rogue);

    // The real leader, at a lower term, says master 4 was removed: its session is accepted.
    let mut leader = TestMaster::start(&cl, Knobs { term: 7, removed: vec![4], ..Knobs::default() }).await;
    let agent = spawn_agent(config(&leader, None, tmp.path()));
    let hello = leader.hello().await;
    assert_eq!(hello.highest_term, u64::MAX);
    leader.wait_for("a heartbeat to the real leader", |e| matches!(e, Event::Frame { .. }).then_some(())).await;
    agent.stop().await.unwrap();
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert_eq!((state.highest_term, state.highest_term_from), (7, Some(1)));
    assert!(state.removed_masters.contains(&4));
    drop(leader);

    // The removed master comes back: refused, whatever term it claims.
    let mut rogue = TestMaster::start(&cl, rogue_knobs()).await;
    let agent = spawn_agent(config(&rogue, None, tmp.path()));
    rogue.hello().await;
    rogue.wait_for("the removed master's session to end", |e| matches!(e, Event::SessionEnded).then_some(())).await;
    agent.stop().await.unwrap();
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert_eq!(state.highest_term, 7, "the removed master's term was not taken");
}

/// A master whose certificate the masters revoked: the agent ends its session, keeps the list,
/// and its next handshake with that master fails (the `certificate_revoked` check of its TLS
/// client), while a master with another certificate is accepted.
#[tokio::test]
async fn a_revoked_master_is_refused_in_the_handshake() {
    let cl = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let list = berth_api::pb::agent::Revocations {
        serials: vec![],
        identities: vec![berth_api::pb::agent::RevokedIdentity { identity: "master/4".into(), at_ms: now_ms + 60_000 }],
    };
    let mut rogue = TestMaster::start(&cl, Knobs { master_id: 4, revoked: Some(list), ..Knobs::default() }).await;
    let agent = spawn_agent(config(&rogue, Some(cl.token.encode()), tmp.path()));
    rogue.hello().await;
    rogue.wait_for("the revoked master's session to end", |e| matches!(e, Event::SessionEnded).then_some(())).await;
    agent.stop().await.unwrap();
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert!(state.revoked_identities.contains_key("master/4"), "{:?}", state.revoked_identities);

    let files = crate::certs::load(tmp.path(), &state.node_id).unwrap();
    let revoked = Arc::new(std::sync::RwLock::new(crate::certs::Revoked {
        serials: state.revoked_serials.clone(),
        identities: state.revoked_identities.clone(),
    }));
    let connect = |addr: String| {
        let cfg = crate::certs::client_config(&files, &revoked).unwrap();
        async move {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(cfg);
            ep.connect(addr.parse().unwrap(), berth_pki::MASTER_SERVER_NAME).unwrap().await
        }
    };
    let err = connect(rogue.addr.clone()).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("revoked"), "{err}");
    let other = TestMaster::start(&cl, Knobs { master_id: 2, ..Knobs::default() }).await;
    connect(other.addr.clone()).await.unwrap();
}

#[tokio::test]
async fn an_incremental_gap_asks_for_a_complete_set() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = spawn_agent(config(&master, Some(cl.token.encode()), tmp.path()));
    let node = master.hello().await.node_id;

    use AssignmentsKind::*;
    master.send(&node, assignments(5, Complete, 0, 1, vec![assignment("a", TaskState::Running)], &[]));
    wait_status(&mut master, "a", TaskState::Running).await;

    master.send(&node, assignments(5, Incremental, 5, 6, vec![assignment("x", TaskState::Running)], &[]));
    let have = master
        .wait_for("RequestComplete", |e| match e {
            Event::Frame { body: agent_frame::Body::RequestComplete(r), .. } => Some(r.have_version),
            _ => None,
        })
        .await;
    assert_eq!(have, 1);

    // In-sequence changes apply: b starts, a is removed (stopped).
    master.send(&node, assignments(5, Incremental, 1, 2, vec![assignment("b", TaskState::Running)], &["a"]));
    wait_statuses(&mut master, &[("b", TaskState::Running), ("a", TaskState::Shutdown)]).await;
    // Desired SHUTDOWN stops a task but keeps its assignment.
    master.send(&node, assignments(5, Incremental, 2, 3, vec![assignment("b", TaskState::Shutdown)], &[]));
    wait_status(&mut master, "b", TaskState::Shutdown).await;
    // A COMPLETE set stops what it does not list.
    master.send(&node, assignments(5, Complete, 0, 10, vec![assignment("c", TaskState::Running)], &[]));
    wait_status(&mut master, "c", TaskState::Running).await;
    let state = AgentState::load(tmp.path()).unwrap().unwrap();
    assert_eq!(state.assignments_version, 10);
    assert_eq!(state.assignments.keys().collect::<Vec<_>>(), ["c"]);
    assert!(!master.drain().iter().any(|e| match e {
        Event::Frame { body: agent_frame::Body::Status(r), .. } => r.tasks.iter().any(|t| t.task_id == "x"),
        _ => false,
    }));
    agent.stop().await.unwrap();

    // The restart reports what it knows; nothing is stopped because the session ended.
    let agent = spawn_agent(config(&master, None, tmp.path()));
    let hello = master.hello().await;
    assert_eq!(hello.assignments_version, 10);
    let c = hello.tasks.iter().find(|t| t.task_id == "c").expect("c in Hello");
    assert_eq!(c.state, TaskState::Running as i32);
    assert!(!hello.tasks.iter().any(|t| t.task_id == "a"), "a's final state was reported already: {hello:?}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_malformed_frame_closes_the_session_and_the_agent_reconnects() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = spawn_agent(config(&master, Some(cl.token.encode()), tmp.path()));
    let node = master.hello().await.node_id;
    // A length far over the limit.
    master.ctrl(&node, Ctrl::Raw(u32::MAX.to_be_bytes().to_vec()));
    master.wait_for("the session to end", |e| matches!(e, Event::SessionEnded).then_some(())).await;
    assert_eq!(master.hello().await.node_id, node);
    // Garbage that does not decode.
    master.ctrl(&node, Ctrl::Raw(vec![0, 0, 0, 3, 0x0f, 0x01, 0x02]));
    master.wait_for("the session to end", |e| matches!(e, Event::SessionEnded).then_some(())).await;
    assert_eq!(master.hello().await.node_id, node);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn an_unauthenticated_close_ends_the_agent_with_a_clear_error() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = spawn_agent(config(&master, Some(cl.token.encode()), tmp.path()));
    let node = master.hello().await.node_id;
    master.ctrl(&node, Ctrl::Close(close::UNAUTHENTICATED, "this node was removed from the cluster".into()));
    let err = tokio::time::timeout(DEADLINE, agent.task).await.expect("the agent gave up").unwrap().unwrap_err();
    assert!(matches!(err, AgentError::Refused { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("this node was removed from the cluster") && msg.contains("new --token"), "{msg}");
}

#[tokio::test]
async fn the_certificate_is_renewed_over_the_session() {
    let cl = cluster();
    // A short certificate: its renewal point comes 2-3.2 s after it was issued, while the session
    // is up (renewals are signed for an hour).
    let mut master = TestMaster::start(&cl, Knobs { join_validity: Duration::from_secs(4), ..Knobs::default() }).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = spawn_agent(config(&master, Some(cl.token.encode()), tmp.path()));
    let node = master.hello().await.node_id;
    let first_cert = std::fs::read_to_string(tmp.path().join(CERT_FILE)).unwrap();
    let first_key = std::fs::read_to_string(tmp.path().join(KEY_FILE)).unwrap();
    master.wait_for("a renewal", |e| matches!(e, Event::Renewed).then_some(())).await;
    tokio::time::timeout(DEADLINE, async {
        while std::fs::read_to_string(tmp.path().join(CERT_FILE)).unwrap() == first_cert {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the renewed certificate was not stored");
    assert_ne!(std::fs::read_to_string(tmp.path().join(KEY_FILE)).unwrap(), first_key, "a fresh key");
    agent.stop().await.unwrap();
    assert!(dir_entries(tmp.path()).iter().all(|n| !n.ends_with(".new") && !n.ends_with(".tmp")));

    // The restarted agent authenticates with the new certificate (the test master checks it) and
    // does not renew again.
    let agent = spawn_agent(config(&master, None, tmp.path()));
    assert_eq!(master.hello().await.node_id, node);
    agent.stop().await.unwrap();
    let renewals = master.drain().iter().filter(|e| matches!(e, Event::Renewed)).count();
    assert_eq!(renewals, 1);
}

#[tokio::test]
async fn twenty_simulated_agents_join_and_say_hello() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let n = 20;
    let cfg = AgentConfig {
        join: vec![master.addr.clone()],
        token: Some(cl.token.encode()),
        data_dir: tmp.path().to_path_buf(),
        name: Some("sim".into()),
        simulate: Some(n),
        ..AgentConfig::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(cfg, shutdown.clone()));
    let mut nodes = BTreeSet::new();
    while nodes.len() < n {
        let hello = master.hello().await;
        nodes.insert(hello.node_id);
    }
    let names: BTreeSet<String> = master
        .drain()
        .iter()
        .filter_map(|e| match e {
            Event::JoinSeen { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(names, (0..n).map(|i| format!("sim-{i}")).collect());
    for i in 0..n {
        let state = AgentState::load(&tmp.path().join(format!("sim-{i}"))).unwrap().expect("a state per agent");
        assert!(nodes.contains(&state.node_id));
        assert_eq!(state.name, format!("sim-{i}"));
    }
    // Every agent has its own session: assignments to one reach only that one.
    let one = nodes.iter().next().unwrap().clone();
    master.send(&one, assignments(5, AssignmentsKind::Complete, 0, 1, vec![assignment("t", TaskState::Running)], &[]));
    let reporter = master
        .wait_for("t RUNNING", |e| match e {
            Event::Frame { node_id, body: agent_frame::Body::Status(r) }
                if r.tasks.iter().any(|t| t.task_id == "t" && t.state == TaskState::Running as i32) =>
            {
                Some(node_id.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(reporter, one);
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
}

#[test]
fn the_config_debug_output_hides_the_token() {
    let cfg = AgentConfig { token: Some("BERTH-1-abc-id.supersecret".into()), ..AgentConfig::default() };
    let text = format!("{cfg:?}");
    assert!(!text.contains("supersecret") && text.contains("<redacted>"), "{text}");
}

/// A larger simulation, run by hand: `cargo test -p berth-agent -- --ignored many_simulated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: a scale check run by hand"]
async fn many_simulated_agents() {
    let n: usize = std::env::var("BERTH_SIM_AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        join: vec![master.addr.clone()],
        token: Some(cl.token.encode()),
        data_dir: tmp.path().to_path_buf(),
        name: Some("sim".into()),
        simulate: Some(n),
        ..AgentConfig::default()
    };
    let started = std::time::Instant::now();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(cfg, shutdown.clone()));
    let mut nodes = BTreeSet::new();
    while nodes.len() < n {
        let hello =
            tokio::time::timeout(Duration::from_secs(300), master.hello()).await.expect("all agents said Hello");
        nodes.insert(hello.node_id);
        master.seen.clear();
    }
    eprintln!("{n} simulated agents joined and said Hello in {:?}", started.elapsed());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task).await.unwrap().unwrap().unwrap();
    eprintln!("stopped after {:?}", started.elapsed());
}

// An agent whose last leader and first known master are silent (a frozen or removed master:
// packets go in, nothing comes back, so each connect would wait out its 5 s timeout) reaches a
// live master at once: the last leader gets a short head start, then every master is dialled
// together and the first to answer wins.
#[tokio::test]
async fn silent_masters_do_not_hold_up_the_reconnect() {
    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let agent = spawn_agent(config(&master, Some(cl.token.encode()), &dir));
    master.hello().await;
    agent.stop().await.unwrap();

    // Two "masters" that swallow every packet.
    let silent: Vec<std::net::UdpSocket> = (0..2).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let silent_addrs: Vec<String> = silent.iter().map(|s| s.local_addr().unwrap().to_string()).collect();
    let mut state = AgentState::load(&dir).unwrap().unwrap();
    state.masters = silent_addrs.iter().cloned().chain([master.addr.clone()]).collect();
    state.last_leader = Some(silent_addrs[0].clone());
    state.save(&dir).unwrap();

    let began = std::time::Instant::now();
    let agent = spawn_agent(config(&master, None, &dir));
    master.hello().await;
    let took = began.elapsed();
    assert!(took < Duration::from_secs(3), "reaching the live master took {took:?}");
    agent.stop().await.unwrap();
    drop(silent);
}

/// (task id, file id, contents) as a driver was handed them.
type SeenFiles = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A driver that records what the session hands it about storage, and publishes volume usage
/// the test sets.
struct StorageDriver {
    sim: SimulatedDriver,
    node: Arc<Mutex<Option<String>>>,
    files: SeenFiles,
    usage: tokio::sync::watch::Receiver<crate::volume::UsageReport>,
}

impl Driver for StorageDriver {
    async fn start(&self, a: &Assignment) {
        self.sim.start(a).await;
    }

    async fn stop(&self, task_id: &str) {
        self.sim.stop(task_id).await;
    }

    fn identify(&self, node_id: &str) {
        *self.node.lock().unwrap() = Some(node_id.to_string());
    }

    fn task_files(&self, task_id: &str, files: &[berth_api::pb::agent::FileData]) {
        let mut seen = self.files.lock().unwrap();
        seen.extend(files.iter().map(|f| (task_id.to_string(), f.id.clone(), f.data.clone())));
    }

    fn volume_usage(&self) -> Option<tokio::sync::watch::Receiver<crate::volume::UsageReport>> {
        Some(self.usage.clone())
    }
}

// The session's part of storage: Hello names the allowed host paths (normalised); the driver
// learns the node id before anything runs; the contents of a task's secrets reach the driver
// from COMPLETE and INCREMENTAL sets but never the state file; volume usage goes out in status
// reports, at the start of a session and on every change.
#[tokio::test]
async fn the_session_carries_host_paths_file_contents_and_volume_usage() {
    use berth_api::pb::agent::{FileData, VolumeUsage};

    let cl = cluster();
    let mut master = TestMaster::start(&cl, Knobs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(&master, Some(cl.token.encode()), tmp.path());
    cfg.allow_host_paths = vec!["/srv//data/".into(), "/mnt/x/../y".into()];
    let (sink, statuses) = status_channel();
    let (usage_tx, usage) = tokio::sync::watch::channel(Arc::new(vec![VolumeUsage {
        key: "default/db".into(),
        used_bytes: 1,
        capacity_bytes: 10,
    }]));
    let node_seen = Arc::new(Mutex::new(None));
    let files = Arc::new(Mutex::new(Vec::new()));
    let driver =
        StorageDriver { sim: SimulatedDriver::new(sink), node: node_seen.clone(), files: files.clone(), usage };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_with_driver(cfg, driver, statuses, shutdown.clone()));
    let agent = RunningAgent { shutdown, task };

    let hello = master.hello().await;
    assert_eq!(hello.host_paths, ["/srv/data", "/mnt/y"]);
    assert_eq!(node_seen.lock().unwrap().as_deref(), Some(hello.node_id.as_str()));
    let node = hello.node_id;
    let usage_of = |e: &Event| match e {
        Event::Frame { body: agent_frame::Body::Status(r), .. } if !r.volumes.is_empty() => Some(r.volumes.clone()),
        _ => None,
    };
    let first = master.wait_for("the volume usage", usage_of).await;
    assert_eq!((first[0].key.as_str(), first[0].used_bytes), ("default/db", 1));

    let secret = b"TOPSECRET-value-of-the-test".to_vec();
    let mut a = assignment("with-secret", TaskState::Running);
    a.files = vec![FileData { id: "secret/pw@1".into(), data: secret.clone() }];
    use AssignmentsKind::*;
    master.send(&node, assignments(5, Complete, 0, 1, vec![a.clone()], &[]));
    wait_status(&mut master, "with-secret", TaskState::Running).await;
    let mut b = assignment("later", TaskState::Running);
    b.files = vec![FileData { id: "config/app@2".into(), data: b"color=blue".to_vec() }];
    master.send(&node, assignments(5, Incremental, 1, 2, vec![b], &[]));
    wait_status(&mut master, "later", TaskState::Running).await;
    {
        let seen = files.lock().unwrap();
        assert!(seen.contains(&("with-secret".into(), "secret/pw@1".into(), secret.clone())), "{seen:?}");
        assert!(seen.iter().any(|(t, id, _)| t == "later" && id == "config/app@2"), "{seen:?}");
    }
    let state = std::fs::read(tmp.path().join(STATE_FILE)).unwrap();
    assert!(!state.windows(secret.len()).any(|w| w == secret.as_slice()), "the secret reached agent.json");
    assert!(AgentState::load(tmp.path()).unwrap().unwrap().assignments.contains_key("with-secret"));

    usage_tx.send_replace(Arc::new(vec![VolumeUsage { key: "default/db".into(), used_bytes: 7, capacity_bytes: 10 }]));
    master.wait_for("the new volume usage", |e| usage_of(e).filter(|v| v[0].used_bytes == 7).map(|_| ())).await;
    agent.stop().await.unwrap();
}
