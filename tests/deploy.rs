//! The deployment files in deploy/: the systemd units are valid (systemd-analyze verify, no
//! warning), the master's hardening stays strict (systemd-analyze security), the agent's unit
//! keeps tasks alive across an agent restart (KillMode=process), a master tells systemd when it
//! serves, and the backup unit's commands save snapshots and keep the seven newest.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use berth_tests::berth_bin;

fn unit(name: &str) -> Result<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The unit with its ExecStart pointing at the binary under test, written to `dir`.
fn installed(dir: &std::path::Path, name: &str) -> Result<PathBuf> {
    let text = unit(name)?.replace("/usr/local/bin/berth", &berth_bin().display().to_string());
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn analyze(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .context("running systemd-analyze (Debian's systemd package; deploy/prereqs.sh installs it)")?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into()))
}

#[test]
fn the_systemd_units_are_valid_and_the_master_is_hardened() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let master = installed(dir.path(), "berth-master.service")?;
    let agent = installed(dir.path(), "berth-agent.service")?;
    let backup = installed(dir.path(), "berth-backup.service")?;
    let timer = installed(dir.path(), "berth-backup.timer")?;
    for u in [&master, &agent, &backup, &timer] {
        let (ok, _, err) = analyze(&["verify", "--man=no", &u.display().to_string()])?;
        if !ok || !err.trim().is_empty() {
            bail!("systemd-analyze verify {}: {err}", u.display());
        }
    }
    // systemd's exposure score: 0 (locked down) to 10 (exposed); "OK" is below 5.
    let (_, out, err) = analyze(&["security", "--offline=true", &master.display().to_string()])?;
    let level: f64 = out
        .lines()
        .chain(err.lines())
        .find_map(|l| l.split("exposure level for berth-master.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no exposure level in: {out}{err}"))?;
    assert!(level <= 2.0, "the master's unit is hardened (exposure {level}, at most 2.0 expected)");
    let m = unit("berth-master.service")?;
    for must in ["Type=notify", "Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict", "User=berth"] {
        assert!(m.lines().any(|l| l == must), "berth-master.service has {must}");
    }
    let a = unit("berth-agent.service")?;
    for must in ["Type=notify", "Restart=always", "KillMode=process", "Delegate=yes"] {
        assert!(a.lines().any(|l| l == must), "berth-agent.service has {must}");
    }
    Ok(())
}

/// The master tells its service manager when it serves (Type=notify), through $NOTIFY_SOCKET.
#[test]
fn a_master_notifies_its_service_manager_once_it_serves() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock_path = dir.path().join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    manager.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    let ep = format!("127.0.0.1:{}", berth_tests::free_port());
    berth_tests::pki_init(&dir.path().join("pki"))?;
    let mut child = Command::new(berth_bin())
        .args(["master", "--id", "1", "--listen", &ep, "--initial-cluster", &format!("1={ep}")])
        .arg("--pki-dir")
        .arg(dir.path().join("pki"))
        .arg("--data-dir")
        .arg(dir.path().join("m1"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut buf = [0u8; 512];
    let got = manager.recv(&mut buf);
    let _ = child.kill();
    let _ = child.wait();
    let n = got.context("no readiness message within 60 s")?;
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.starts_with("READY=1\n") && msg.contains(&format!("serving on {ep}")), "{msg}");
    Ok(())
}

/// The shell command of a unit's `Exec...=/bin/sh -c '...'` line, as systemd would run it.
fn shell_of(unit_text: &str, key: &str) -> Option<String> {
    let line = unit_text.lines().find(|l| l.starts_with(&format!("{key}=/bin/sh -c '")))?;
    let cmd = line.split_once("-c '")?.1.strip_suffix('\'')?;
    Some(cmd.replace("%%", "%"))
}

/// berth-backup.service's own commands against a real cluster: a snapshot file appears, and only
/// the seven newest are kept.
#[test]
fn the_backup_unit_saves_snapshots_and_keeps_seven() -> Result<()> {
    let c = berth_tests::Cluster::start(1, &[])?;
    assert!(c.put("backup/k", "v"));
    let text = unit("berth-backup.service")?;
    let pki = c.pki_dir();
    let toml = c.dir.path().join("berth.toml");
    std::fs::write(
        &toml,
        format!(
            "endpoints = [\"{}\"]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            c.endpoints(),
            pki.join("ca.crt").display(),
            pki.join("admin.crt").display(),
            pki.join("admin.key").display()
        ),
    )?;
    let state = c.dir.path().join("backups");
    std::fs::create_dir_all(&state)?;
    // Eight older backups.
    for i in 0..8 {
        let f = state.join(format!("berth-2026010{i}T000000Z.snap"));
        std::fs::write(&f, b"old")?;
        let when = format!("2026-01-0{} 00:00:00", i + 1);
        assert!(Command::new("touch").args(["-d", &when]).arg(&f).status()?.success());
    }
    let run = |key: &str| -> Result<()> {
        let cmd = shell_of(&text, key)
            .with_context(|| format!("berth-backup.service has no {key}=/bin/sh -c '...'"))?
            .replace("/usr/local/bin/berth", &berth_bin().display().to_string())
            .replace("/etc/berth/berth.toml", &toml.display().to_string());
        let out = Command::new("/bin/sh").args(["-c", &cmd]).env("STATE_DIRECTORY", &state).output()?;
        if !out.status.success() {
            bail!("{key}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run("ExecStart")?;
    run("ExecStartPost")?;
    let mut kept: Vec<String> =
        std::fs::read_dir(&state)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    kept.sort();
    assert_eq!(kept.len(), 7, "the seven newest are kept: {kept:?}");
    let newest = kept.last().unwrap();
    assert!(newest.starts_with("berth-20") && !newest.starts_with("berth-202601"), "{kept:?}");
    assert!(std::fs::metadata(state.join(newest))?.len() > 100, "a real snapshot, not an empty file");
    assert!(!kept.contains(&"berth-20260100T000000Z.snap".to_string()), "the oldest went: {kept:?}");
    Ok(())
}

/// The version-skew policy on the wire: the leader refuses a join from an agent newer than the
/// masters or more than one minor version behind, with what to upgrade, and takes one a minor
/// version behind.
#[test]
fn agents_outside_the_version_skew_are_refused_with_what_to_upgrade() -> Result<()> {
    let c = berth_tests::Cluster::start(3, &[])?;
    let token = berth_tests::token(&c, &["--uses", "5"])?;
    let this = berth_api::version::Version::this();
    let newer = format!("{}.{}.0", this.major, this.minor + 1);
    let why = berth_tests::join_as_version(&c.endpoints(), &c.pki_dir(), &token, &newer)?.unwrap_err();
    assert!(why.contains("upgrade the masters first"), "{why}");
    if this.minor >= 2 {
        let older = format!("{}.{}.0", this.major, this.minor - 2);
        let why = berth_tests::join_as_version(&c.endpoints(), &c.pki_dir(), &token, &older)?.unwrap_err();
        assert!(why.contains("upgrade this agent"), "{why}");
    }
    let other_major = format!("{}.{}.0", this.major + 1, this.minor);
    let why = berth_tests::join_as_version(&c.endpoints(), &c.pki_dir(), &token, &other_major)?.unwrap_err();
    assert!(why.contains("version"), "{why}");
    // Refusals used no token use; this build's own version is taken (the token's CSR check is
    // what stops this hand-made join, after the version check).
    let same = berth_tests::join_as_version(&c.endpoints(), &c.pki_dir(), &token, berth_api::version::VERSION)?;
    assert!(same.as_ref().is_err_and(|m| !m.contains("version")), "{same:?}");
    Ok(())
}

/// `deploy/compose.sh down` when dropped, so a failing test leaves no containers behind.
struct Compose {
    env: Vec<(&'static str, String)>,
}

impl Compose {
    fn script(&self, args: &[&str]) -> Result<std::process::Output> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose.sh");
        Ok(Command::new("bash").arg(script).args(args).envs(self.env.iter().map(|(k, v)| (*k, v))).output()?)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if let Ok(out) = self.script(&["down"])
            && !out.status.success()
        {
            eprintln!("compose.sh down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// deploy/compose.yaml through deploy/compose.sh: 3 masters and 3 agents as containers, each with
/// its own address; a service's tasks keep running, with the same ids, when the leader's container
/// is killed; and `down` removes it all.
#[test]
fn compose_cluster_keeps_its_tasks_when_the_leader_container_dies() -> Result<()> {
    let task_image = berth_tests::docker_test_image()?;
    let dir = tempfile::tempdir()?;
    let project = format!("berthtest{}", std::process::id());
    let compose = Compose {
        env: vec![
            ("BERTH_COMPOSE_DIR", dir.path().display().to_string()),
            ("BERTH_PROJECT", project.clone()),
            ("BERTH_IMAGE", "berth-test/berth:compose".to_string()),
        ],
    };
    let up = compose.script(&["up", &berth_bin().display().to_string()])?;
    if !up.status.success() {
        bail!("compose.sh up: {}{}", String::from_utf8_lossy(&up.stdout), String::from_utf8_lossy(&up.stderr));
    }
    let config = dir.path().join("berth.toml");
    let berth = |args: &[&str]| Command::new(berth_bin()).args(args).env("BERTH_CONFIG", &config).output();
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = berth(&a)?;
        if !out.status.success() {
            bail!("berth {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let spec = dir.path().join("sleepers.yaml");
    std::fs::write(
        &spec,
        format!(
            "kind: Service\nmetadata: {{name: sleepers}}\nspec:\n  replicas: 3\n  task:\n    runtime: docker\n    \
             image: {task_image}\n    command: [\"/bin/busybox\", \"sleep\", \"100000\"]\n"
        ),
    )?;
    let out = berth(&["apply", "-f", &spec.display().to_string(), "--wait"])?;
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let running = || -> Option<Vec<String>> {
        let tasks = json(&["get", "tasks", "--service", "sleepers"]).ok()?;
        let mut ids: Vec<String> = tasks
            .as_array()?
            .iter()
            .filter(|t| t["state"] == "running")
            .filter_map(|t| t["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        Some(ids)
    };
    let before = berth_tests::wait_for(std::time::Duration::from_secs(60), "3 running tasks", || {
        running().filter(|ids| ids.len() == 3)
    })?;
    let leader = json(&["cluster", "status"])?["leader"].as_u64().context("a leader")?;
    let killed = Command::new("docker").args(["kill", &format!("{project}_master-{leader}_1")]).output()?;
    assert!(killed.status.success(), "docker kill: {}", String::from_utf8_lossy(&killed.stderr));
    berth_tests::wait_for(std::time::Duration::from_secs(30), "a new leader", || {
        let l = json(&["cluster", "status"]).ok()?["leader"].as_u64()?;
        (l != 0 && l != leader).then_some(())
    })?;
    let after =
        berth_tests::wait_for(std::time::Duration::from_secs(30), "the tasks seen through the new leader", || {
            running().filter(|ids| ids.len() == 3)
        })?;
    assert_eq!(before, after, "the same tasks keep running: nothing was restarted or replaced");
    for id in &after {
        let state =
            Command::new("docker").args(["inspect", "-f", "{{.State.Running}}", &format!("berth-{id}")]).output()?;
        assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "true", "task container of {id} runs");
    }
    drop(compose);
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=berth.owner=/data/{project}/agent-1")])
        .output()?;
    assert!(left.stdout.is_empty(), "down removed the agents' tasks");
    Ok(())
}
