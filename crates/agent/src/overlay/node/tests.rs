//! The view and leases (pure), and two hosts running the whole overlay (root only): a task on
//! host A resolves a service by name on its gateway's DNS and reaches it through the VIP on
//! host B's task, across the VXLAN tunnel.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use berth_api::pb::agent::{Endpoint, NetworkPeer, NetworkState, ServiceEndpoints, ServicePort as PbPort};

use super::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn state(block: &str, peer: (&str, &str)) -> NetworkState {
    NetworkState {
        key: "default/backend".into(),
        subnet: "198.18.0.0/16".into(),
        vni: 4242,
        internal: false,
        block: block.into(),
        peers: vec![NetworkPeer { node_id: "other".into(), underlay: peer.0.into(), block: peer.1.into() }],
    }
}

fn web(endpoints: &[(&str, &str)]) -> ServiceEndpoints {
    ServiceEndpoints {
        key: "default/web".into(),
        vip: "198.19.0.10".into(),
        endpoint_mode: "vip".into(),
        ports: vec![PbPort { name: "http".into(), protocol: "tcp".into(), port: 8080, ingress: 0 }],
        networks: vec!["default/backend".into()],
        endpoints: endpoints
            .iter()
            .map(|(id, a)| Endpoint {
                task_id: id.to_string(),
                node_id: "other".into(),
                addresses: [("default/backend".to_string(), a.to_string())].into(),
            })
            .collect(),
    }
}

fn complete(version: u64, networks: Vec<NetworkState>, services: Vec<ServiceEndpoints>) -> NetworkUpdate {
    NetworkUpdate { kind: AssignmentsKind::Complete as i32, version, networks, services, ..Default::default() }
}

#[test]
fn updates_chain_by_version_and_gaps_are_reported() {
    let mut v = View::default();
    v.apply(&complete(
        3,
        vec![state("198.18.1.0/24", ("198.19.255.2", "198.18.2.0/24"))],
        vec![web(&[("web.1.a", "198.18.2.2")])],
    ))
    .unwrap();
    assert_eq!(v.version, 3);
    assert_eq!(v.networks["default/backend"].block, Some(net("198.18.1.0/24")));
    assert_eq!(v.services["default/web"].endpoints.len(), 1);
    // An increment on top of 3 removes the endpoint.
    let inc = NetworkUpdate {
        kind: AssignmentsKind::Incremental as i32,
        version: 4,
        base_version: 3,
        services: vec![web(&[])],
        ..Default::default()
    };
    v.apply(&inc).unwrap();
    assert!(v.services["default/web"].endpoints.is_empty());
    // One that does not follow is a gap, and changes nothing.
    let stale = NetworkUpdate { base_version: 9, version: 10, removed_services: vec!["default/web".into()], ..inc };
    assert_eq!(v.apply(&stale), Err(Gap { have: 4, base: 9 }));
    assert!(v.services.contains_key("default/web"));
    // COMPLETE replaces everything.
    v.apply(&complete(11, vec![], vec![])).unwrap();
    assert!(v.networks.is_empty() && v.services.is_empty());
}

#[test]
fn leases_hand_out_the_lowest_free_address_and_keep_a_tasks_own() {
    let mut l = Leases::default();
    let b = net("198.18.1.0/28");
    assert_eq!(l.lease("n", b, "t1"), Some("198.18.1.2".parse().unwrap()));
    assert_eq!(l.lease("n", b, "t2"), Some("198.18.1.3".parse().unwrap()));
    assert_eq!(l.lease("n", b, "t1"), Some("198.18.1.2".parse().unwrap()), "a task keeps its address");
    l.release("t1");
    assert_eq!(l.lease("n", b, "t3"), Some("198.18.1.2".parse().unwrap()), "freed once released");
    for i in 4..100 {
        l.lease("n", b, &format!("x{i}"));
    }
    assert_eq!(l.lease("n", b, "late"), None, "a /28 block holds 13 tasks");
}

// ---------------------------------------------------------------------------------------------
// Two hosts, root only.

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `f` on a thread of its own inside the network namespace `ns`, with a runtime whose
/// threads are all in that namespace (threads inherit their creator's namespace): how an agent
/// started inside its host's namespace runs.
fn on_host<T: Send + 'static>(ns: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

fn sh(ns: &Path, cmd: &str) {
    let st = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["sh", "-c", cmd])
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

/// Namespaces and directories of the test, removed even when it fails.
struct Cleanup(Vec<PathBuf>, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = link::delete_netns(p);
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn dns_query_a(from: &Path, server: Ipv4Addr, port: u16, name: &str) -> Vec<Ipv4Addr> {
    use hickory_server::proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let name = Name::from_ascii(name).unwrap();
    let mut m = Message::query();
    m.add_query(Query::query(name, RecordType::A));
    m.metadata.recursion_desired = true;
    let bytes = m.to_vec().unwrap();
    let from = from.to_path_buf();
    let (tx, rx) = mpsc::channel();
    on_host(from, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(&bytes, (server, port)).unwrap();
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf).unwrap();
        let answer = Message::from_vec(&buf[..n]).unwrap();
        let addrs: Vec<Ipv4Addr> =
            answer.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0) } else { None }).collect();
        tx.send(addrs).unwrap();
    })
    .join()
    .unwrap();
    rx.recv().unwrap()
}

#[test]
fn two_hosts_resolve_and_reach_a_service_through_its_vip() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = PathBuf::from(format!("/run/berth-test-overlay/{}", std::process::id()));
    let mut cleanup = Cleanup(Vec::new(), dir.clone());
    let (host_a, host_b) = (dir.join("host-a"), dir.join("host-b"));
    for h in [&host_a, &host_b] {
        link::create_netns(h).unwrap();
        cleanup.0.push(h.clone());
    }
    // The underlay: a veth between the hosts.
    sh(&host_a, &format!("ip link add ul0 type veth peer name ul0b && ip link set ul0b netns {}", host_b.display()));
    sh(&host_a, "ip addr add 198.19.255.1/24 dev ul0 && ip link set ul0 up && ip link set lo up");
    sh(&host_b, "ip addr add 198.19.255.2/24 dev ul0b && ip link set ul0b up && ip link set lo up");

    let dns_port = 5353;
    let config = |host: &str, underlay: &str| OverlayConfig {
        dir: dir.join(format!("{host}-data")),
        underlay: underlay.parse().unwrap(),
        domain: "berth.internal".into(),
        dns_port,
        nft_table: "berth".into(),
    };
    let update = |me: &str, peer: (&str, &str), endpoints: &[(&str, &str)]| {
        complete(1, vec![state(me, peer)], vec![web(endpoints)])
    };

    // Host B runs the web task (198.18.2.2:8080); host A a client task.
    let (cfg_b, up_b) = (
        config("b", "198.19.255.2"),
        update("198.18.2.0/24", ("198.19.255.1", "198.18.1.0/24"), &[("web.1.a", "198.18.2.2")]),
    );
    let (ready_b_tx, ready_b_rx) = mpsc::channel();
    let (stop_b_tx, stop_b_rx) = mpsc::channel::<()>();
    let b = on_host(host_b.clone(), move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut o = Overlay::start(cfg_b).await.unwrap();
            o.update(&up_b).await.unwrap().unwrap();
            let at = o.attach("web.1.a", "default", &["backend".to_string()], &[], None).await.unwrap();
            assert_eq!(at.addresses["backend"], "198.18.2.2".parse::<Ipv4Addr>().unwrap());
            ready_b_tx.send(at.netns.clone()).unwrap();
            tokio::task::spawn_blocking(move || stop_b_rx.recv()).await.unwrap().ok();
            o.detach("web.1.a").await.unwrap();
        });
    });
    let web_ns = ready_b_rx.recv_timeout(Duration::from_secs(60)).expect("host b ready");
    cleanup.0.push(web_ns.clone());
    // The web task: a TCP server in its namespace that answers "hi".
    let listener = on_host(web_ns, || TcpListener::bind("198.18.2.2:8080").unwrap()).join().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hi");
        }
    });

    let (cfg_a, up_a) = (
        config("a", "198.19.255.1"),
        update("198.18.1.0/24", ("198.19.255.2", "198.18.2.0/24"), &[("web.1.a", "198.18.2.2")]),
    );
    let (ready_a_tx, ready_a_rx) = mpsc::channel();
    let (stop_a_tx, stop_a_rx) = mpsc::channel::<()>();
    let a = on_host(host_a.clone(), move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut o = Overlay::start(cfg_a).await.unwrap();
            o.update(&up_a).await.unwrap().unwrap();
            let at = o.attach("client.1.a", "default", &["backend".to_string()], &[], None).await.unwrap();
            assert!(at.resolv_conf.contains("nameserver 198.18.1.1"), "{}", at.resolv_conf);
            ready_a_tx.send(at.netns.clone()).unwrap();
            tokio::task::spawn_blocking(move || stop_a_rx.recv()).await.unwrap().ok();
            o.detach("client.1.a").await.unwrap();
        });
    });
    let client_ns = ready_a_rx.recv_timeout(Duration::from_secs(60)).expect("host a ready");
    cleanup.0.push(client_ns.clone());

    // DNS on the client's gateway answers the VIP; tasks.web the task's address.
    let gw: Ipv4Addr = "198.18.1.1".parse().unwrap();
    assert_eq!(
        dns_query_a(&client_ns, gw, dns_port, "web.default.svc.berth.internal."),
        ["198.19.0.10".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(dns_query_a(&client_ns, gw, dns_port, "tasks.web."), ["198.18.2.2".parse::<Ipv4Addr>().unwrap()]);
    // The VIP leads to the task on the other host, across the tunnel.
    let got = on_host(client_ns.clone(), || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect_timeout(&"198.19.0.10:8080".parse().unwrap(), Duration::from_secs(1)) {
                Ok(mut s) => {
                    let mut b = String::new();
                    s.read_to_string(&mut b).unwrap();
                    return b;
                }
                Err(e) if Instant::now() > deadline => panic!("VIP unreachable: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
    .join()
    .unwrap();
    assert_eq!(got, "hi");
    stop_a_tx.send(()).unwrap();
    stop_b_tx.send(()).unwrap();
    a.join().unwrap();
    b.join().unwrap();
}
