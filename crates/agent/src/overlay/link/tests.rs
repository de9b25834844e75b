//! Two "hosts" (network namespaces joined by a veth underlay), each with a network's bridge and
//! VXLAN device and a task namespace: TCP between the tasks crosses the overlay. Root only.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use super::*;

/// Namespaces made by a test, removed even when it fails.
struct Spaces {
    dir: PathBuf,
    made: Vec<PathBuf>,
}

impl Spaces {
    fn new() -> Spaces {
        let dir = PathBuf::from(format!("/run/berth-test-netns/{}", std::process::id()));
        Spaces { dir, made: Vec::new() }
    }

    fn make(&mut self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        create_netns(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        self.made.push(p.clone());
        p
    }
}

impl Drop for Spaces {
    fn drop(&mut self) {
        // Task namespaces first: their veths go with them, then the hosts' devices.
        for p in self.made.iter().rev() {
            let _ = delete_netns(p);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn links(n: u32, underlay: &str) -> NetworkLinks {
    NetworkLinks {
        bridge: "bn-4096".into(),
        vxlan: "vx-4096".into(),
        vni: 4096,
        block: net(&format!("198.18.{n}.0/24")),
        underlay: underlay.parse().unwrap(),
        underlay_mtu: 1500,
    }
}

fn task_if(n: u32) -> TaskInterface {
    TaskInterface {
        host_name: link_name("vt", &format!("task-{n}")),
        inside_name: "eth0".into(),
        bridge: "bn-4096".into(),
        address: net(&format!("198.18.{n}.2/24")),
        gateway: format!("198.18.{n}.1").parse().unwrap(),
        mtu: 1450,
        default_route: true,
        subnet: net("198.18.0.0/16"),
    }
}

async fn connect_from(task: &Path, to: SocketAddr) -> Result<std::io::Result<TcpStream>> {
    in_netns(task, move |_| async move { Ok(TcpStream::connect_timeout(&to, Duration::from_millis(500))) }).await
}

#[tokio::test]
async fn tasks_on_two_hosts_talk_over_the_overlay() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return Ok(());
    }
    let mut spaces = Spaces::new();
    let (host_a, host_b) = (spaces.make("host-a"), spaces.make("host-b"));
    // The underlay: one veth pair between the two hosts.
    let hb = host_b.clone();
    in_netns(&host_a, move |l| async move {
        l.handle.link().add(LinkVeth::new("ul0", "ul0b").build()).execute().await.map_err(ctx("underlay veth"))?;
        let peer = l.index("ul0b").await?.ok_or_else(|| missing("ul0b"))?;
        let f = std::fs::File::open(&hb).map_err(ctx("host b"))?;
        l.handle
            .link()
            .set(LinkUnspec::new_with_index(peer).setns_by_fd(f.as_raw_fd()).build())
            .execute()
            .await
            .map_err(ctx("move"))?;
        let ul = l.index("ul0").await?.ok_or_else(|| missing("ul0"))?;
        l.ensure_address(ul, net("198.19.255.1/24")).await?;
        l.handle.link().set(LinkUnspec::new_with_index(ul).up().build()).execute().await.map_err(ctx("up"))
    })
    .await?;
    in_netns(&host_b, |l| async move {
        let ul = l.index("ul0b").await?.ok_or_else(|| missing("ul0b"))?;
        l.ensure_address(ul, net("198.19.255.2/24")).await?;
        l.handle.link().set(LinkUnspec::new_with_index(ul).up().build()).execute().await.map_err(ctx("up"))
    })
    .await?;

    let (task_a, task_b) = (spaces.make("task-a"), spaces.make("task-b"));
    for (host, n, me, peer, task) in [
        (&host_a, 1, "198.19.255.1", "198.19.255.2", task_a.clone()),
        (&host_b, 2, "198.19.255.2", "198.19.255.1", task_b.clone()),
    ] {
        let (me, peer) = (me.to_string(), peer.to_string());
        in_netns(host, move |l| async move {
            let nl = links(n, &me);
            l.ensure_network(&nl).await?;
            let other = 3 - n;
            let added =
                l.set_peers(&nl, &[Peer { underlay: peer.parse().unwrap(), block: links(other, &peer).block }]).await?;
            assert_eq!(added, (1, 0));

            l.attach(&task, &task_if(n)).await?;
            // Everything again: nothing changes, nothing fails (an agent restart does this).
            l.ensure_network(&nl).await?;
            let again =
                l.set_peers(&nl, &[Peer { underlay: peer.parse().unwrap(), block: links(other, &peer).block }]).await?;
            assert_eq!(again, (0, 0));
            l.attach(&task, &task_if(n)).await
        })
        .await?;
    }

    // The bridge's MAC is its own, not its first port's: it must not change when a task goes.
    let mac = |ns: &std::path::Path| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["ip", "-o", "link", "show", "bn-4096"])
            .output()
            .expect("nsenter ip");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_string)
    };
    let want = bridge_mac(links(1, "198.19.255.1").block).map(|b| format!("{b:02x}")).join(":");
    assert_eq!(mac(&host_a).as_deref(), Some(want.as_str()));

    // A server in task b, a client in task a: the bytes cross the VXLAN tunnel.
    let listener =
        in_netns(&task_b, |_| async { TcpListener::bind("198.18.2.2:7000").map_err(ctx("binding in task b")) }).await?;
    let server = std::thread::spawn(move || -> std::io::Result<SocketAddr> {
        let (mut s, from) = listener.accept()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        Ok(from)
    });
    // The first packets wait for the underlay's ARP: retry until a deadline, not once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match connect_from(&task_a, "198.18.2.2:7000".parse().unwrap()).await? {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => return Err(ctx("connecting a -> b")(e)),
            Err(_) => {}
        }
    };
    c.write_all(b"hello").map_err(ctx("write"))?;
    let mut back = [0u8; 5];
    c.read_exact(&mut back).map_err(ctx("read"))?;
    assert_eq!(&back, b"hello");
    let from = server.join().unwrap().map_err(ctx("server"))?;
    assert_eq!(from.ip().to_string(), "198.18.1.2", "no NAT inside the overlay");

    // Without the peer, the block is unreachable.
    let (removed_tx, removed_rx) = tokio::sync::oneshot::channel();
    in_netns(&host_a, move |l| async move {
        let _ = removed_tx.send(l.set_peers(&links(1, "198.19.255.1"), &[]).await?);
        Ok(())
    })
    .await?;
    assert_eq!(removed_rx.await.unwrap(), (0, 1));
    let gone = connect_from(&task_a, "198.18.2.2:7000".parse().unwrap()).await?;
    assert!(gone.is_err(), "connected without a route to the peer's block");
    drop(spaces);
    Ok(())
}

#[test]
fn names_and_macs_are_stable() {
    assert_eq!(vtep_mac(net("198.18.2.0/24")), [0x0a, 0x58, 198, 18, 2, 0]);
    let a = link_name("vt", "web.1.abcdef0123");
    assert_eq!(a.len(), 15);
    assert_eq!(a, link_name("vt", "web.1.abcdef0123"));
    assert_ne!(a, link_name("vt", "web.2.abcdef0123"));
    // FNV-1a of "" is its offset basis: the name never depends on the build.
    assert_eq!(link_name("x", ""), "xcbf29ce4842223");
}
