//! Refusal checks at the TLS level, with real clients: gRPC without a client certificate, with
//! one from another CA, an admin certificate on the Raft service; QUIC without a certificate and
//! with one from another CA.

use std::{path::Path, str::FromStr, time::Duration};

use anyhow::{Result, bail};
use berth_api::pb::{
    agent::{AgentFrame, Hello, MasterFrame, agent_frame},
    raft::{LocalStatusRequest, raft_client::RaftClient},
};
use berth_pki::{CertificateAuthority, CertifiedKey, Identity, MASTER_SERVER_NAME, tls::TlsFiles};

fn read(p: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(p)?)
}

async fn raft_status(endpoint: &str, tls: tonic::transport::ClientTlsConfig) -> Result<(), String> {
    let ch = tonic::transport::Channel::from_shared(format!("https://{endpoint}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    RaftClient::new(ch).local_status(LocalStatusRequest {}).await.map(|_| ()).map_err(|s| s.to_string())
}

/// A QUIC connection to a master presenting `client`, or no certificate (the CA pinned by its
/// digest, as a joining agent does).
async fn quic_connect(
    endpoint: &str,
    ca_pem: &str,
    client: Option<CertifiedKey>,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let tls = match client {
        Some(cert) => berth_pki::tls::client_config(&TlsFiles { ca_pem: ca_pem.into(), cert }, &[berth_channel::ALPN])
            .map_err(|e| e.to_string())?,
        None => {
            let digest = berth_pki::CaDigest::of_cert_pem(ca_pem).map_err(|e| e.to_string())?;
            berth_pki::tls::pinned_client_config(&digest, &[berth_channel::ALPN]).map_err(|e| e.to_string())?
        }
    };
    let cfg = berth_channel::client_config(tls).map_err(|e| e.to_string())?;
    let ep = berth_channel::client_endpoint("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    let addr = endpoint.parse().map_err(|e: std::net::AddrParseError| e.to_string())?;
    let conn = ep
        .connect_with(cfg, addr, MASTER_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // The endpoint is returned too: it must outlive the connection's use.
    Ok((ep, conn))
}

/// A QUIC session attempt presenting `client` (or no certificate); Ok when the master answered
/// with any frame, Err with the reason otherwise.
async fn quic_hello(endpoint: &str, ca_pem: &str, client: Option<CertifiedKey>) -> Result<MasterFrame, String> {
    let (_ep, conn) = quic_connect(endpoint, ca_pem, client).await?;
    let (send, recv) = conn.open_bi().await.map_err(|e| format!("open stream: {e}"))?;
    let mut w = berth_channel::FrameWriter::new(send);
    let mut r = berth_channel::FrameReader::new(recv);
    let hello =
        AgentFrame { body: Some(agent_frame::Body::Hello(Hello { node_id: "intruder".into(), ..Default::default() })) };
    w.send(&hello).await.map_err(|e| format!("send: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), r.recv::<MasterFrame>()).await {
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err("stream closed".into()),
        Ok(Err(e)) => Err(format!("recv: {e}")),
        Err(_) => Err("no answer within 5s".into()),
    }
}

/// A join as an agent of version `version` would make it (with a real token); the master's
/// answer: Ok(JoinAccepted's node id) or Err(JoinRejected's message, or what went wrong).
pub fn join_as_version(endpoints: &str, pki: &Path, token: &str, version: &str) -> Result<Result<String, String>> {
    use berth_api::pb::agent::{JoinRequest, master_frame};
    berth_pki::tls::install_crypto_provider();
    let ca_pem = read(&pki.join("ca.crt"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(rt.block_on(async {
        // The leader takes joins; the others answer NotLeader.
        let mut last = String::new();
        for endpoint in endpoints.split(',') {
            let (_ep, conn) = quic_connect(endpoint, &ca_pem, None).await?;
            let (send, recv) = conn.open_bi().await.map_err(|e| format!("open stream: {e}"))?;
            let mut w = berth_channel::FrameWriter::new(send);
            let mut r = berth_channel::FrameReader::new(recv);
            let join = JoinRequest {
                token: token.into(),
                name: "skewed".into(),
                agent_version: version.into(),
                ..Default::default()
            };
            w.send(&AgentFrame { body: Some(agent_frame::Body::Join(join)) })
                .await
                .map_err(|e| format!("send: {e}"))?;
            match tokio::time::timeout(Duration::from_secs(10), r.recv::<MasterFrame>()).await {
                Ok(Ok(Some(MasterFrame { body: Some(master_frame::Body::JoinAccepted(a)) }))) => return Ok(a.node_id),
                Ok(Ok(Some(MasterFrame { body: Some(master_frame::Body::JoinRejected(j)) }))) => {
                    if j.error == berth_api::pb::agent::JoinError::NotLeader as i32 {
                        last = j.message;
                        continue;
                    }
                    return Err(j.message);
                }
                other => return Err(format!("unexpected answer: {other:?}")),
            }
        }
        Err(format!("no master took the join: {last}"))
    }))
}

/// Sends raw bytes as the first frame of a join connection and returns how the master closed it.
async fn raw_first_frame(endpoint: &str, ca_pem: &str, bytes: &[u8]) -> Result<String, String> {
    let (_ep, conn) = quic_connect(endpoint, ca_pem, None).await?;
    let (mut send, _recv) = conn.open_bi().await.map_err(|e| format!("open stream: {e}"))?;
    send.write_all(bytes).await.map_err(|e| format!("write: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == berth_channel::close::MALFORMED_FRAME => {
            Ok(String::from_utf8_lossy(&c.reason).into_owned())
        }
        Ok(e) => Err(format!("closed, but not as a malformed frame: {e}")),
        Err(_) => Err("the master kept the connection open".into()),
    }
}

/// A frame announcing 100 MiB, and a frame that is not protobuf: each closes that connection
/// with MALFORMED_FRAME and nothing else.
pub fn bad_frames_close_the_session(endpoints: &str, pki: &Path) -> Result<()> {
    berth_pki::tls::install_crypto_provider();
    let endpoint = endpoints.split(',').next().unwrap_or_default().to_string();
    let ca_pem = read(&pki.join("ca.crt"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let oversized = (100u32 << 20).to_be_bytes();
        let reason = raw_first_frame(&endpoint, &ca_pem, &oversized).await.map_err(anyhow::Error::msg)?;
        eprintln!("oversized frame: closed with {reason:?}");
        let mut garbage = 8u32.to_be_bytes().to_vec();
        garbage.extend([0xff; 8]);
        let reason = raw_first_frame(&endpoint, &ca_pem, &garbage).await.map_err(anyhow::Error::msg)?;
        eprintln!("undecodable frame: closed with {reason:?}");
        Ok(())
    })
}

pub fn tls_checks(endpoints: &str, pki: &Path, other_pki: &Path) -> Result<()> {
    berth_pki::tls::install_crypto_provider();
    let endpoint = endpoints.split(',').next().unwrap_or_default().to_string();
    let ca_pem = read(&pki.join("ca.crt"))?;
    let admin = CertifiedKey { cert_pem: read(&pki.join("admin.crt"))?, key_pem: read(&pki.join("admin.key"))? };
    let foreign =
        CertifiedKey { cert_pem: read(&other_pki.join("admin.crt"))?, key_pem: read(&other_pki.join("admin.key"))? };
    // An agent certificate signed by a CA the cluster does not know.
    let rogue_ca = CertificateAuthority::generate("rogue")?;
    let rogue_agent = rogue_ca.issue(&Identity::agent("intruder"), &[], &[], Duration::from_secs(3600))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let no_cert = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
            .domain_name(MASTER_SERVER_NAME);
        if raft_status(&endpoint, no_cert).await.is_ok() {
            bail!("the gRPC port accepted a client without a certificate");
        }
        let foreign_tls = berth_master::client_tls(&TlsFiles { ca_pem: ca_pem.clone(), cert: foreign.clone() });
        if raft_status(&endpoint, foreign_tls).await.is_ok() {
            bail!("the gRPC port accepted a certificate from another CA");
        }
        let admin_tls = berth_master::client_tls(&TlsFiles { ca_pem: ca_pem.clone(), cert: admin.clone() });
        match raft_status(&endpoint, admin_tls).await {
            Ok(()) => bail!("the Raft service accepted an admin certificate"),
            Err(e) if e.contains("masters only") => {}
            Err(e) => bail!("unexpected refusal of an admin certificate on the Raft service: {e}"),
        }
        match quic_hello(&endpoint, &ca_pem, None).await {
            Ok(f) => bail!("QUIC accepted a session without a certificate: {f:?}"),
            Err(e) => eprintln!("QUIC without a certificate refused: {e}"),
        }
        match quic_hello(&endpoint, &ca_pem, Some(rogue_agent)).await {
            Ok(f) => bail!("QUIC accepted an agent certificate from another CA: {f:?}"),
            Err(e) => eprintln!("QUIC with a foreign certificate refused: {e}"),
        }
        Ok(())
    })
}

/// A gRPC call on `path` presenting `cert`, whose request body never ends (nothing is sent):
/// the master can answer it only from the request's head. Ok when the call was refused with a
/// status, Err when it was accepted, or not answered within 5 s (the master was waiting for the
/// body).
async fn refused_before_the_body(endpoint: &str, tls: tonic::transport::ClientTlsConfig, path: &str) -> Result<String> {
    use berth_api::pb::raft::{RaftRequest, RaftResponse};
    let ch = tonic::transport::Channel::from_shared(format!("https://{endpoint}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<RaftRequest, RaftResponse>::default();
    let body = futures::stream::pending::<RaftRequest>();
    let path = tonic::codegen::http::uri::PathAndQuery::from_str(path)?;
    match tokio::time::timeout(Duration::from_secs(5), grpc.streaming(tonic::Request::new(body), path.clone(), codec))
        .await
    {
        Ok(Err(status)) => Ok(format!("{}: {}", status.code(), status.message())),
        Ok(Ok(_)) => bail!("{path} accepted the call"),
        Err(_) => {
            bail!("{path} gave no answer within 5 s: the master waits for the body before checking the certificate")
        }
    }
}

/// An agent's certificate is refused by the Raft service and by reflection from the request's
/// head, before any of the body is read (a Raft message may be 512 MiB).
pub fn agent_refused_before_the_body(endpoints: &str, pki: &Path) -> Result<()> {
    berth_pki::tls::install_crypto_provider();
    let endpoint = endpoints.split(',').next().unwrap_or_default().to_string();
    let ca_pem = read(&pki.join("ca.crt"))?;
    let ca = CertificateAuthority::from_pem(&ca_pem, &read(&pki.join("ca.key"))?)?;
    let agent = ca.issue(&Identity::agent("refused-agent"), &[], &[], Duration::from_secs(3600))?;
    let tls = berth_master::client_tls(&TlsFiles { ca_pem, cert: agent });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        for path in [
            "/berth.v1.raft.Raft/Vote",
            "/berth.v1.raft.Raft/AppendStream",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let refusal = refused_before_the_body(&endpoint, tls.clone(), path).await?;
            if !refusal.contains("may not use") && !refusal.contains("masters only") {
                bail!("{path}: refused, but not for the certificate: {refusal}");
            }
            eprintln!("{path} with an agent certificate: {refusal}");
        }
        Ok(())
    })
}

/// A process's resident set, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// What [`pre_auth_flood`] did and saw.
#[derive(Debug)]
pub struct Flood {
    pub connections: usize,
    pub streams_opened: usize,
    /// Bytes the master's flow control let through, over every stream.
    pub bytes_accepted: u64,
    pub refused: usize,
}

/// `connections` QUIC connections without a certificate (as joining agents), each trying to open
/// `streams` streams and, on each, to send a frame header announcing MAX_FRAME bytes and then
/// `bytes` bytes of body; every write is given 3 s. The connections are kept open until `hold`
/// returns, with what was done so far.
pub fn pre_auth_flood(
    endpoint: &str,
    pki: &Path,
    connections: usize,
    streams: usize,
    bytes: usize,
    hold: impl FnOnce(&Flood) -> Result<()>,
) -> Result<Flood> {
    berth_pki::tls::install_crypto_provider();
    let ca_pem = read(&pki.join("ca.crt"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (endpoint, ca_pem) = (endpoint.to_string(), ca_pem.clone());
            tasks.push(tokio::spawn(async move {
                let Ok((ep, conn)) = quic_connect(&endpoint, &ca_pem, None).await else { return (None, 0, 0) };
                let mut opened = 0;
                let mut accepted = 0u64;
                let mut held = Vec::new();
                for _ in 0..streams {
                    let Ok(Ok((mut send, recv))) = tokio::time::timeout(Duration::from_secs(3), conn.open_bi()).await
                    else {
                        break;
                    };
                    opened += 1;
                    let mut frame = (berth_channel::MAX_FRAME as u32).to_be_bytes().to_vec();
                    frame.resize(4 + bytes, 0x5a);
                    let mut sent = 0;
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                    while sent < frame.len() {
                        match tokio::time::timeout_at(deadline, send.write(&frame[sent..])).await {
                            Ok(Ok(n)) => sent += n,
                            _ => break,
                        }
                    }
                    // Written is not received: count what the peer's flow control granted.
                    accepted += sent as u64;
                    held.push((send, recv));
                }
                (Some((ep, conn, held)), opened, accepted)
            }));
        }
        let mut flood = Flood { connections: 0, streams_opened: 0, bytes_accepted: 0, refused: 0 };
        let mut keep = Vec::new();
        for t in tasks {
            let (held, opened, accepted) = t.await?;
            match held {
                Some(h) => {
                    flood.connections += 1;
                    keep.push(h);
                }
                None => flood.refused += 1,
            }
            flood.streams_opened += opened;
            flood.bytes_accepted += accepted;
        }
        tokio::task::block_in_place(|| hold(&flood))?;
        drop(keep);
        Ok(flood)
    })
}

/// One admin opens watches until the master refuses one: it must refuse the 257th (and say why),
/// and take a new one once an open one is closed. Returns how many were open when it refused.
pub fn watches_are_bounded_per_client(endpoints: &str, pki: &Path) -> Result<usize> {
    use berth_api::pb::{WatchRequest, kv_client::KvClient};
    berth_pki::tls::install_crypto_provider();
    let endpoint = endpoints.split(',').next().unwrap_or_default().to_string();
    let ca_pem = read(&pki.join("ca.crt"))?;
    let admin = CertifiedKey { cert_pem: read(&pki.join("admin.crt"))?, key_pem: read(&pki.join("admin.key"))? };
    let tls = berth_master::client_tls(&TlsFiles { ca_pem, cert: admin });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // Several connections: one HTTP/2 connection carries a bounded number of streams.
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(
                tonic::transport::Channel::from_shared(format!("https://{endpoint}"))?
                    .tls_config(tls.clone())?
                    .connect()
                    .await?,
            );
        }
        let mut open = Vec::new();
        for i in 0..1000 {
            let mut kv = KvClient::new(channels[i % channels.len()].clone());
            let req = WatchRequest { key: format!("watch-limit/{i}").into_bytes(), ..Default::default() };
            match tokio::time::timeout(Duration::from_secs(10), kv.watch(req)).await {
                Ok(Ok(r)) => {
                    let mut s = r.into_inner();
                    // Established once the master confirmed it.
                    s.message().await?.ok_or_else(|| anyhow::anyhow!("watch {i} ended at once"))?;
                    open.push(s);
                }
                Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                    if !status.message().contains("close some first") {
                        bail!("refused without saying why: {}", status.message());
                    }
                    let n = open.len();
                    open.pop();
                    // The place is freed once the master has seen the stream go.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    loop {
                        let mut kv = KvClient::new(channels[0].clone());
                        let req = WatchRequest { key: b"watch-limit/again".to_vec(), ..Default::default() };
                        match kv.watch(req).await {
                            Ok(_) => return Ok(n),
                            Err(e) if tokio::time::Instant::now() > deadline => {
                                bail!("a closed watch did not free its place: {e}")
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                }
                Ok(Err(status)) => bail!("watch {i}: {status}"),
                Err(_) => bail!("watch {i}: no answer within 10 s"),
            }
        }
        bail!("1000 watches of one client were all accepted")
    })
}
