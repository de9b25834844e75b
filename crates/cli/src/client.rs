//! A client of the masters: tries endpoints in turn and follows leader hints.

use std::{future::Future, sync::Mutex, time::Duration};

use anyhow::{Context, Result, anyhow};
use berth_api::pb::{cluster_client::ClusterClient, kv_client::KvClient, nodes_client::NodesClient};
use tonic::{
    Code, Status,
    transport::{Channel, ClientTlsConfig},
};

/// Largest message the client sends or accepts (the masters cap values at 1 MiB by default).
const MESSAGE_LIMIT: usize = 16 * 1024 * 1024;

pub struct Client {
    endpoints: Vec<String>,
    tls: ClientTlsConfig,
    /// Index into `endpoints` of the last endpoint that answered.
    preferred: Mutex<usize>,
    /// How long to keep retrying while no leader is available.
    pub patience: Duration,
}

fn is_transport_error(s: &Status) -> bool {
    // tonic reports connection failures as Unavailable/Unknown with a transport message.
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
        && (s.message().contains("transport")
            || s.message().contains("connect")
            || s.message().contains("tcp")
            || s.message().contains("h2 protocol error")
            || s.message().contains("broken pipe")
            || s.message().is_empty())
}

impl Client {
    pub fn new(endpoints: Vec<String>, tls: ClientTlsConfig) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(anyhow!(
                "no master endpoints: pass --endpoints HOST:PORT,..., set BERTH_ENDPOINTS, or point \
                 --config/BERTH_CONFIG at the berth.toml that `berth dev` writes"
            ));
        }
        Ok(Client { endpoints, tls, preferred: Mutex::new(0), patience: Duration::from_secs(10) })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn channel(&self, endpoint: &str) -> Result<Channel> {
        let host = endpoint.split_once("://").map_or(endpoint, |(_, h)| h);
        Ok(Channel::from_shared(format!("https://{host}"))
            .with_context(|| format!("{endpoint:?} is not a valid endpoint (expected HOST:PORT)"))?
            .tls_config(self.tls.clone())
            .context("TLS configuration")?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy())
    }

    pub fn kv(ch: Channel) -> KvClient<Channel> {
        KvClient::new(ch).max_decoding_message_size(MESSAGE_LIMIT).max_encoding_message_size(MESSAGE_LIMIT)
    }

    pub fn cluster(ch: Channel) -> ClusterClient<Channel> {
        ClusterClient::new(ch).max_decoding_message_size(MESSAGE_LIMIT).max_encoding_message_size(MESSAGE_LIMIT)
    }

    pub fn nodes(ch: Channel) -> NodesClient<Channel> {
        NodesClient::new(ch).max_decoding_message_size(64 << 20)
    }

    pub fn control(ch: Channel) -> berth_api::pb::control_service_client::ControlServiceClient<Channel> {
        berth_api::pb::control_service_client::ControlServiceClient::new(ch)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(MESSAGE_LIMIT)
    }

    /// Runs `f` against the masters until one answers: a transport error moves on to the next
    /// endpoint, a not-leader answer moves to the hinted leader, and "no leader yet" waits with
    /// backoff for up to `patience`. Any other error is final.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.patience;
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
                None => (self.endpoints[next % self.endpoints.len()].clone(), Some(next % self.endpoints.len())),
            };
            let ch = self.channel(&endpoint).map_err(|e| Status::invalid_argument(e.to_string()))?;
            match f(ch).await {
                Ok(v) => {
                    if let Some(i) = idx {
                        *self.preferred.lock().expect("lock") = i;
                    }
                    return Ok(v);
                }
                Err(s) => {
                    let transport = is_transport_error(&s);
                    let leader_hint = berth_api::leader_hint(&s);
                    let retryable = transport
                        || s.code() == Code::Unavailable && s.message().starts_with(berth_api::NOT_LEADER_PREFIX)
                        || s.code() == Code::Unavailable && s.message().contains("no leader");
                    if !retryable {
                        return Err(s);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(last_error(s, &self.endpoints));
                    }
                    if let Some(h) = leader_hint.filter(|h| *h != endpoint) {
                        hint = Some(h);
                    } else {
                        next += 1;
                        failed_in_row += 1;
                        if failed_in_row >= self.endpoints.len() {
                            failed_in_row = 0;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                }
            }
        }
    }
}

fn last_error(s: Status, endpoints: &[String]) -> Status {
    if is_transport_error(&s) {
        Status::unavailable(format!(
            "no master answered at {}: {}. Are the masters running? (`berth dev` starts a local cluster)",
            endpoints.join(","),
            s.message()
        ))
    } else {
        s
    }
}
