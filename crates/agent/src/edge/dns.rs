//! Publication: an edge agent started with `--apps-domain` answers DNS for that zone
//! authoritatively (UDP): each route's host has an A record for every edge node that is ready
//! and not drained, as the leader last said; the apex has an SOA; any other name in the zone is
//! NXDOMAIN (with the SOA, for negative caching), and names outside it are REFUSED (this is no
//! recursive resolver).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_server::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// TTL of the answers: short, so a drained edge leaves clients' caches quickly.
const TTL: u32 = 5;

/// The zone's content: host -> addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    pub hosts: BTreeMap<String, Vec<Ipv4Addr>>,
}

/// A running zone server.
pub struct AppsDns {
    zone: Arc<Mutex<Zone>>,
    cancel: CancellationToken,
    pub addr: SocketAddr,
}

impl Drop for AppsDns {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl AppsDns {
    /// Binds `addr` (UDP) and serves `domain`.
    pub async fn start(addr: SocketAddr, domain: &str) -> Result<AppsDns, String> {
        let apex = Name::from_ascii(format!("{}.", domain.trim_end_matches('.')))
            .map_err(|e| format!("--apps-domain {domain}: not a DNS name ({e})"))?;
        let socket =
            UdpSocket::bind(addr).await.map_err(|e| format!("the apps domain's DNS cannot listen on {addr}: {e}"))?;
        let addr = socket.local_addr().map_err(|e| e.to_string())?;
        let zone = Arc::new(Mutex::new(Zone::default()));
        let cancel = CancellationToken::new();
        tokio::spawn(serve(socket, apex, zone.clone(), cancel.clone()));
        Ok(AppsDns { zone, cancel, addr })
    }

    pub fn set(&self, zone: Zone) {
        *self.zone.lock().unwrap_or_else(|p| p.into_inner()) = zone;
    }
}

async fn serve(socket: UdpSocket, apex: Name, zone: Arc<Mutex<Zone>>, cancel: CancellationToken) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    warn!("apps domain DNS: {e}");
                    continue;
                }
            },
        };
        let Ok(request) = Message::from_vec(&buf[..len]) else {
            debug!(%peer, "apps domain DNS: an undecodable query");
            continue;
        };
        if request.metadata.message_type != MessageType::Query {
            continue;
        }
        let snapshot = zone.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let reply = answer(&request, &apex, &snapshot);
        match reply.to_vec() {
            Ok(bytes) => {
                let _ = socket.send_to(&bytes, peer).await;
            }
            Err(e) => debug!("apps domain DNS: encoding a reply: {e}"),
        }
    }
}

fn soa(apex: &Name) -> Record {
    let mname = Name::from_ascii("ns").ok().and_then(|n| n.append_domain(apex).ok()).unwrap_or_else(|| apex.clone());
    let rname =
        Name::from_ascii("hostmaster").ok().and_then(|n| n.append_domain(apex).ok()).unwrap_or_else(|| apex.clone());
    Record::from_rdata(apex.clone(), TTL, RData::SOA(SOA::new(mname, rname, 1, 60, 60, 3600, TTL)))
}

/// The reply to one query.
pub fn answer(request: &Message, apex: &Name, zone: &Zone) -> Message {
    let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    let [query] = request.queries.as_slice() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    reply.add_query(query.clone());
    let name = query.name();
    if !apex.zone_of(name) {
        reply.metadata.response_code = ResponseCode::Refused;
        return reply;
    }
    reply.metadata.authoritative = true;
    let host = name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let addrs = zone.hosts.get(&host);
    if name == apex {
        if matches!(query.query_type(), RecordType::SOA | RecordType::ANY) {
            reply.add_answer(soa(apex));
        } else {
            reply.add_authority(soa(apex));
        }
        return reply;
    }
    match addrs {
        None => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.add_authority(soa(apex));
        }
        Some(addrs) if matches!(query.query_type(), RecordType::A | RecordType::ANY) && !addrs.is_empty() => {
            for a in addrs {
                reply.add_answer(Record::from_rdata(name.clone(), TTL, RData::A(A(*a))));
            }
        }
        // The name exists, without records of that type (or no edge serves now): NODATA.
        Some(_) => {
            reply.add_authority(soa(apex));
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::op::Query;

    fn ask(name: &str, zone: &Zone) -> Message {
        let mut q = Message::new(7, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        answer(&q, &Name::from_ascii("apps.example.test.").unwrap(), zone)
    }

    #[test]
    fn answers_route_hosts_with_the_serving_edges() {
        let mut zone = Zone::default();
        zone.hosts
            .insert("shop.apps.example.test".into(), vec![Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2)]);
        zone.hosts.insert("empty.apps.example.test".into(), vec![]);
        let r = ask("Shop.apps.example.test.", &zone);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 2);
        let r = ask("nope.apps.example.test.", &zone);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.authorities.len(), 1);
        let r = ask("empty.apps.example.test.", &zone);
        assert_eq!((r.metadata.response_code, r.answers.len()), (ResponseCode::NoError, 0));
        let r = ask("example.com.", &zone);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }
}
