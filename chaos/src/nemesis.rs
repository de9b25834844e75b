//! The nemesis: every fault the suite can inject, how it is applied and how it is healed. Which
//! fault, which target and how long it lasts all come from the run's seeded RNG, so that a seed
//! replays the same schedule.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use rand::{Rng, rngs::StdRng, seq::SliceRandom};
use serde::Serialize;

use crate::{
    cluster::{Cluster, Launch},
    workload,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    KillLeader,
    KillRandom,
    KillMinority,
    PauseLeader,
    Restart,
    PartitionLeader,
    PartitionHalves,
    PartitionBridge,
    OneWay,
    PacketDrop,
    AgentCutoff,
    DiskFull,
    FsyncEio,
    ClockSkew,
    Membership,
    /// kill -9 of a real agent, restarted after a while; injected by the churn scenario right
    /// after it deleted or scaled down a service, while the agent is stopping the tasks. Not in
    /// [`Fault::ALL`]: the random mix keeps the schedule its recorded seeds replay.
    KillAgent,
    /// kill -9 of a task of the networks scenario's web service (its process, not berth's); done
    /// by that scenario's workload. Not in [`Fault::ALL`] either.
    KillTask,
}

impl Fault {
    pub const ALL: [Fault; 15] = [
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::KillMinority,
        Fault::PauseLeader,
        Fault::Restart,
        Fault::PartitionLeader,
        Fault::PartitionHalves,
        Fault::PartitionBridge,
        Fault::OneWay,
        Fault::PacketDrop,
        Fault::AgentCutoff,
        Fault::DiskFull,
        Fault::FsyncEio,
        Fault::ClockSkew,
        Fault::Membership,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillRandom => "kill-random",
            Fault::KillMinority => "kill-minority",
            Fault::PauseLeader => "pause-leader",
            Fault::Restart => "restart",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionHalves => "partition-halves",
            Fault::PartitionBridge => "partition-bridge",
            Fault::OneWay => "one-way",
            Fault::PacketDrop => "packet-drop",
            Fault::AgentCutoff => "agent-cutoff",
            Fault::DiskFull => "disk-full",
            Fault::FsyncEio => "fsync-eio",
            Fault::ClockSkew => "clock-skew",
            Fault::Membership => "membership",
            Fault::KillAgent => "kill-agent",
            Fault::KillTask => "kill-task",
        }
    }

    /// Whether it needs namespaces (root): partitions, and the tmpfs of the disk-full fault.
    pub fn needs_net(self) -> bool {
        matches!(
            self,
            Fault::PartitionLeader
                | Fault::PartitionHalves
                | Fault::PartitionBridge
                | Fault::OneWay
                | Fault::PacketDrop
                | Fault::AgentCutoff
                | Fault::DiskFull
                | Fault::KillTask
        )
    }

    /// Whether it touches agents (then tasks may legitimately be replaced).
    pub fn touches_agents(self) -> bool {
        matches!(self, Fault::AgentCutoff | Fault::KillAgent)
    }

    /// Whether the time to the first committed write after it is a failover measurement.
    pub fn is_failover(self) -> bool {
        matches!(self, Fault::KillLeader | Fault::PauseLeader | Fault::PartitionLeader)
    }
}

/// One injected fault, as the run's log records it.
#[derive(Clone, Debug, Serialize)]
pub struct Injected {
    pub fault: Fault,
    pub at_ms: u64,
    pub held_ms: u64,
    pub targets: Vec<u64>,
    /// For failover faults: time from the injection to the first committed write.
    pub failover_ms: Option<f64>,
    pub note: String,
}

/// What must be undone after a fault's hold time.
enum Heal {
    Nothing,
    Restart(Vec<u64>),
    Resume(u64),
    Network,
    RemoveFiller(u64, std::path::PathBuf),
    Relaunch(u64),
    StartAgent(usize),
}

pub struct Nemesis {
    pub rng: StdRng,
    pub start: Instant,
    pub log: Vec<Injected>,
    probe_no: u64,
    file: Option<std::fs::File>,
    /// Killed agents waiting for their restart: (agent index, killed at, hold, record so far).
    down_agents: Vec<(usize, Instant, Duration, Injected)>,
}

impl Nemesis {
    pub fn new(rng: StdRng, start: Instant, file: &std::path::Path) -> Nemesis {
        Nemesis {
            rng,
            start,
            log: Vec::new(),
            probe_no: 0,
            file: std::fs::File::create(file).ok(),
            down_agents: Vec::new(),
        }
    }

    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn hold(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(lo_ms..=hi_ms))
    }

    fn random_master(&mut self, c: &Cluster, except: Option<u64>) -> Option<u64> {
        let ids: Vec<u64> = c.masters.keys().copied().filter(|id| Some(*id) != except).collect();
        ids.get(self.rng.random_range(0..ids.len().max(1))).copied()
    }

    /// Injects `fault`, holds it, heals it, and records it. The failover probe runs while the
    /// fault holds.
    pub async fn inject(&mut self, c: &mut Cluster, fault: Fault) -> Result<()> {
        let leader = c.wait_leader(Duration::from_secs(30)).await.map(|l| l.0).ok();
        let at_ms = self.ms();
        let t0 = Instant::now();
        let mut targets = Vec::new();
        let mut note = String::new();
        let hold;
        let heal = match fault {
            Fault::KillLeader | Fault::KillRandom | Fault::KillMinority => {
                let ids: Vec<u64> = match fault {
                    Fault::KillLeader => leader.into_iter().collect(),
                    Fault::KillRandom => self.random_master(c, None).into_iter().collect(),
                    _ => {
                        let mut ids: Vec<u64> = c.masters.keys().copied().collect();
                        ids.shuffle(&mut self.rng);
                        ids.truncate((c.masters.len() - 1) / 2);
                        ids
                    }
                };
                for id in &ids {
                    c.kill_master(*id);
                }
                targets = ids.clone();
                hold = self.hold(200, 2500);
                Heal::Restart(ids)
            }
            Fault::PauseLeader => {
                let id = leader.context("no leader to pause")?;
                c.pause_master(id);
                targets.push(id);
                // Longer than the election timeout (200-400 ms), as a long GC pause would be.
                hold = self.hold(800, 3000);
                Heal::Resume(id)
            }
            Fault::Restart => {
                let id = self.random_master(c, None).context("no master")?;
                tokio::task::block_in_place(|| c.stop_master(id))?;
                c.start_master(id)?;
                targets.push(id);
                hold = Duration::ZERO;
                Heal::Nothing
            }
            Fault::PartitionLeader | Fault::PartitionHalves | Fault::PartitionBridge | Fault::OneWay => {
                let net = c.net.as_ref().context("partitions need network namespaces (root)")?;
                let mut ids: Vec<u64> = c.masters.keys().copied().collect();
                ids.shuffle(&mut self.rng);
                let host = |id: u64| c.masters[&id].host.clone().expect("masters have hosts when there is a net");
                let ip = |id: u64| c.masters[&id].ip;
                match fault {
                    Fault::PartitionLeader => {
                        let l = leader.context("no leader to isolate")?;
                        let others: Vec<_> = ids.iter().filter(|i| **i != l).map(|i| ip(*i)).collect();
                        net.cut(&host(l), &others)?;
                        targets.push(l);
                    }
                    Fault::PartitionHalves => {
                        let minority = (ids.len() - 1) / 2;
                        let majority_ips: Vec<_> = ids[minority..].iter().map(|i| ip(*i)).collect();
                        for id in &ids[..minority] {
                            net.cut(&host(*id), &majority_ips)?;
                        }
                        targets = ids[..minority].to_vec();
                        note = format!("minority {:?} | majority {:?}", &ids[..minority], &ids[minority..]);
                    }
                    Fault::PartitionBridge => {
                        // Two sides that cannot see each other, and one master in the middle that sees both.
                        let side = (ids.len() - 1) / 2;
                        let (a, rest) = ids.split_at(side);
                        let (bridge, b) = rest.split_at(1);
                        let b_ips: Vec<_> = b.iter().map(|i| ip(*i)).collect();
                        for id in a {
                            net.cut(&host(*id), &b_ips)?;
                        }
                        targets = bridge.to_vec();
                        note = format!("{a:?} | bridge {bridge:?} | {b:?}");
                    }
                    _ => {
                        // The leader's messages to one follower are lost (or the follower's to it).
                        let l = leader.context("no leader")?;
                        let f = *ids.iter().find(|i| **i != l).context("no follower")?;
                        let (from, to) = if self.rng.random_bool(0.5) { (l, f) } else { (f, l) };
                        net.cut_outbound(&host(from), ip(to))?;
                        targets = vec![from, to];
                        note = format!("{from} -> {to} lost");
                    }
                }
                hold = self.hold(500, 3000);
                Heal::Network
            }
            Fault::PacketDrop => {
                let net = c.net.as_ref().context("packet drop needs network namespaces (root)")?;
                let percent = self.rng.random_range(10..=40u8);
                for m in c.masters.values() {
                    net.drop_random(m.host.as_ref().context("host")?, percent)?;
                }
                note = format!("{percent}% of packets dropped at every master");
                hold = self.hold(1000, 3000);
                Heal::Network
            }
            Fault::AgentCutoff => {
                let net = c.net.as_ref().context("agent cut-off needs network namespaces (root)")?;
                let i = self.rng.random_range(0..c.agents.len().max(1));
                let a = c.agents.get(i).context("no agent")?;
                let ips: Vec<_> = c.masters.values().map(|m| m.ip).collect();
                net.cut(a.host.as_ref().context("agent host")?, &ips)?;
                targets.push(i as u64 + 1);
                note = format!("{} cut off from every master", a.name);
                // Past the node-down grace (10 s) about half of the time: then its tasks are
                // replaced, and the at-most-once task must have stopped before its replacement.
                hold = self.hold(3000, 16000);
                Heal::Network
            }
            Fault::DiskFull => {
                let id = self.random_master(c, None).context("no master")?;
                let m = &c.masters[&id];
                if !m.tmpfs {
                    anyhow::bail!("disk-full needs the masters' data dirs on tmpfs (root)");
                }
                let filler = m.data_dir.join("chaos-filler");
                let written = fill(&filler);
                targets.push(id);
                note = format!("master {id}'s disk filled ({} MiB written)", written >> 20);
                hold = self.hold(1000, 3000);
                Heal::RemoveFiller(id, filler)
            }
            Fault::FsyncEio => {
                let id = self.random_master(c, None).context("no master")?;
                c.kill_master(id);
                let after = self.rng.random_range(0..200u32);
                c.masters.get_mut(&id).context("master")?.launch = Launch::FsyncEio { after };
                c.start_master(id)?;
                targets.push(id);
                note =
                    format!("master {id} under strace: every fsync/fdatasync after the first {after} fails with EIO");
                hold = self.hold(2000, 5000);
                Heal::Relaunch(id)
            }
            Fault::ClockSkew => {
                let id = self.random_master(c, None).context("no master")?;
                c.kill_master(id);
                let offset_s = self.rng.random_range(30..=600i64) * if self.rng.random_bool(0.5) { 1 } else { -1 };
                c.masters.get_mut(&id).context("master")?.launch = Launch::Skewed { offset_s };
                c.start_master(id)?;
                targets.push(id);
                note = format!("master {id}'s wall clock off by {offset_s:+} s");
                hold = self.hold(2000, 5000);
                Heal::Relaunch(id)
            }
            Fault::Membership => {
                let victim = self.random_master(c, leader).context("no follower")?;
                c.remove_member(victim).await?;
                let new_id = c.masters.keys().max().copied().unwrap_or(0).max(victim) + 1;
                c.add_member(new_id).await?;
                targets = vec![victim, new_id];
                note = format!("master {victim} removed, master {new_id} added");
                hold = Duration::ZERO;
                Heal::Nothing
            }
            Fault::KillAgent => {
                // The plain form: a random agent, whatever it is doing (the churn scenario uses
                // `kill_agent`, aimed at an agent that is stopping tasks).
                let i = self.rng.random_range(0..c.agents.len().max(1));
                c.agents.get(i).context("no agent")?;
                c.kill_agent(i);
                targets.push(i as u64 + 1);
                hold = self.hold(1500, 9000);
                Heal::StartAgent(i)
            }
            Fault::KillTask => {
                anyhow::bail!("kill-task is injected by the networks scenario's workload, which knows the tasks")
            }
        };
        let failover_ms = if fault.is_failover() {
            let chans: Vec<_> = c
                .masters
                .values()
                .filter(|m| Some(m.id) != leader && m.child.is_some())
                .filter_map(|m| c.channel(&m.endpoint).ok())
                .collect();
            self.probe_no += 1;
            let key = format!("chaos-failover/{}", self.probe_no);
            workload::first_write(&chans, &key, Duration::from_secs(30))
                .await
                .map(|_| t0.elapsed().as_secs_f64() * 1000.0)
        } else {
            None
        };
        let rest = hold.saturating_sub(t0.elapsed());
        tokio::time::sleep(rest).await;
        self.heal(c, heal).await?;
        let rec = Injected { fault, at_ms, held_ms: t0.elapsed().as_millis() as u64, targets, failover_ms, note };
        self.record(rec);
        Ok(())
    }

    /// Records a fault that a workload injected itself and that needs no healing (a task kill).
    pub fn record_now(&mut self, fault: Fault, note: String) {
        let rec = Injected { fault, at_ms: self.ms(), held_ms: 0, targets: Vec::new(), failover_ms: None, note };
        self.record(rec);
    }

    fn record(&mut self, rec: Injected) {
        if let Some(f) = self.file.as_mut() {
            let _ = serde_json::to_writer(&mut *f, &rec);
            let _ = f.write_all(b"\n");
        }
        self.log.push(rec);
    }

    /// kill -9 of real agent `i` (not its tasks: their shims lead process groups of their own,
    /// as after a crash of the agent). It is restarted by the first [`Nemesis::restart_due_agents`]
    /// after a drawn hold of 1.5-9 s (the caller's next step, so it may be down a little longer,
    /// close to the 10 s node-down grace), or when everything heals. Returns the hold.
    pub fn kill_agent(&mut self, c: &mut Cluster, i: usize, note: String) -> Duration {
        let hold = self.hold(1500, 9000);
        c.kill_agent(i);
        let rec = Injected {
            fault: Fault::KillAgent,
            at_ms: self.ms(),
            held_ms: 0,
            targets: vec![i as u64 + 1],
            failover_ms: None,
            note,
        };
        self.down_agents.push((i, Instant::now(), hold, rec));
        hold
    }

    /// Whether real agent `i` is down (killed, not restarted yet).
    pub fn agent_down(&self, i: usize) -> bool {
        self.down_agents.iter().any(|d| d.0 == i)
    }

    /// Restarts the killed agents whose hold has passed (all of them with `all`).
    pub fn restart_due_agents(&mut self, c: &mut Cluster, all: bool) -> Result<()> {
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.down_agents)
            .into_iter()
            .partition(|(_, t0, hold, _)| all || t0.elapsed() >= *hold);
        self.down_agents = wait;
        for (i, t0, _, mut rec) in due {
            c.start_agent(i).with_context(|| format!("restarting agent {}", i + 1))?;
            rec.held_ms = t0.elapsed().as_millis() as u64;
            self.record(rec);
        }
        Ok(())
    }

    async fn heal(&mut self, c: &mut Cluster, heal: Heal) -> Result<()> {
        match heal {
            Heal::Nothing => {}
            Heal::Restart(ids) => {
                for id in ids {
                    c.start_master(id)?;
                }
            }
            Heal::Resume(id) => c.resume_master(id),
            Heal::Network => {
                if let Some(net) = &c.net {
                    net.heal_all()?;
                }
            }
            Heal::RemoveFiller(id, filler) => {
                let _ = std::fs::remove_file(filler);
                // What an operator does once space is back: restart the master, whatever state
                // its storage errors left it in.
                c.kill_master(id);
                c.start_master(id)?;
            }
            Heal::Relaunch(id) => {
                c.kill_master(id);
                if let Some(m) = c.masters.get_mut(&id) {
                    m.launch = Launch::Normal;
                }
                c.start_master(id)?;
            }
            Heal::StartAgent(i) => c.start_agent(i)?,
        }
        Ok(())
    }

    /// Undoes everything still in force: network rules, killed agents, pauses, stopped masters.
    pub async fn heal_everything(&mut self, c: &mut Cluster) -> Result<()> {
        if let Some(net) = &c.net {
            net.heal_all()?;
        }
        self.restart_due_agents(c, true)?;
        let ids: Vec<u64> = c.masters.keys().copied().collect();
        for id in ids {
            c.resume_master(id);
            let _ = c.master_exited(id);
            if c.masters[&id].launch != Launch::Normal {
                c.kill_master(id);
                c.masters.get_mut(&id).context("master")?.launch = Launch::Normal;
            }
            c.start_master(id)?;
        }
        Ok(())
    }
}

/// Writes zeros to `path` until the disk is full; returns the bytes written.
fn fill(path: &std::path::Path) -> u64 {
    let Ok(mut f) = std::fs::File::create(path) else { return 0 };
    let chunk = vec![0u8; 1 << 20];
    let mut n = 0u64;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    // The last partial chunk: fill the remaining bytes too.
    let small = [0u8; 4096];
    while f.write_all(&small).is_ok() {
        n += small.len() as u64;
    }
    n
}
