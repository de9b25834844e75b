//! Who may do what: users with roles, namespaces as the scope of a role, the audit log, and
//! removing a user. Real masters, driven by the real CLI with each user's own credentials.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use berth_tests::{Cluster, berth_bin, berth_ok, wait_for};

/// `berth ARGS` with the credentials `berth user add` wrote into `dir` (its berth.toml), at
/// `endpoint` when given.
fn as_user(dir: &Path, endpoint: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(berth_bin());
    cmd.args(args).arg("--config").arg(dir.join("berth.toml"));
    if let Some(ep) = endpoint {
        cmd.args(["--endpoints", ep]);
    }
    for var in ["BERTH_CONFIG", "BERTH_ENDPOINTS", "BERTH_CA_CERT", "BERTH_CERT", "BERTH_KEY"] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).output().expect("running the berth CLI")
}

fn ok(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn refused(out: &Output, what: &str) -> Result<String> {
    if out.status.success() {
        bail!("{what} was allowed: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn service(ns: &str, name: &str) -> String {
    format!(
        "kind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: 0\n  task:\n    runtime: process\n    command: [sleep, '3600']\n"
    )
}

/// The audit records (as `berth audit -o json` prints them) of `identity`.
fn audit_of(c: &Cluster, identity: &str) -> Result<Vec<serde_json::Value>> {
    let out = berth_ok(c, &["audit", "--identity", identity, "-o", "json"])?;
    out.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

fn has_record(records: &[serde_json::Value], verb: &str, resource: &str, outcome_start: &str) -> bool {
    records.iter().any(|r| {
        r["verb"] == verb
            && r["resource"] == resource
            && r["outcome"].as_str().is_some_and(|o| o.starts_with(outcome_start))
    })
}

// A view user of namespace a reads a and nothing else, writes nothing; an edit user of a works
// there but creates no token; no user writes /berth/ through KV, and only a cluster-admin reads
// it; every refusal says who, what and where, and the audit log holds each attempt (and every
// change, with its revision) on every master, never a secret's value; a removed user's
// certificate is refused by every master within a second.
#[test]
fn users_are_held_to_their_roles_and_every_attempt_is_audited() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    c.wait_leader(Duration::from_secs(10))?;
    let root = c.dir.path().to_path_buf();
    let creds = |name: &str| -> PathBuf { root.join(format!("users/{name}")) };
    for (name, role, ns) in
        [("viewer", "view", Some("a")), ("editor", "edit", Some("a")), ("root", "cluster-admin", None)]
    {
        let out_dir = creds(name);
        let mut args = vec!["user", "add", name, "--role", role, "--out", out_dir.to_str().unwrap()];
        if let Some(ns) = ns {
            args.extend(["--namespace", ns]);
        }
        let out = berth_ok(&c, &args)?;
        assert!(out.contains(&format!("user {name} added")), "{out}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out_dir.join(format!("{name}.key")))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key made for {name} is private");
    }
    // A name is given once.
    let out = c.berth(&["user", "add", "viewer", "--role", "view", "--out", root.join("again").to_str().unwrap()]);
    assert!(refused(&out, "a second viewer")?.contains("exists"));
    let users = berth_ok(&c, &["user", "ls"])?;
    assert!(users.contains("view in a") && users.contains("edit in a") && users.contains("cluster-admin"), "{users}");

    // Workloads in two namespaces (no agents: they stay at 0 replicas).
    let docs = root.join("docs.yaml");
    std::fs::write(&docs, format!("{}---\n{}", service("a", "web"), service("b", "db")))?;
    berth_ok(&c, &["apply", "-f", docs.to_str().unwrap()])?;

    let (viewer, editor, admin) = (creds("viewer"), creds("editor"), creds("root"));
    // The view user reads its namespace...
    let out = ok(&as_user(&viewer, None, &["get", "services", "-n", "a", "-o", "json"]), "viewer reads a")?;
    assert!(out.contains("\"web\""), "{out}");
    // ...sees only it when it names none...
    let out = ok(&as_user(&viewer, None, &["get", "services", "-o", "json"]), "viewer lists")?;
    assert!(out.contains("\"web\"") && !out.contains("\"db\""), "{out}");
    // ...and not another one.
    let err = refused(&as_user(&viewer, None, &["get", "services", "-n", "b"]), "viewer reads b")?;
    assert!(err.contains("user/viewer may not list services in namespace b"), "{err}");
    assert!(err.contains("view in namespace a"), "the refusal says what the user holds: {err}");
    // It writes nothing.
    let mine = root.join("mine.yaml");
    std::fs::write(&mine, service("a", "mine"))?;
    let err = refused(&as_user(&viewer, None, &["apply", "-f", mine.to_str().unwrap()]), "viewer applies")?;
    assert!(err.contains("user/viewer may not create services in namespace a"), "{err}");
    let err = refused(&as_user(&viewer, None, &["scale", "web=2", "-n", "a"]), "viewer scales")?;
    assert!(err.contains("user/viewer may not update services in namespace a"), "{err}");
    let err = refused(&as_user(&viewer, None, &["kv", "put", "app/x", "1"]), "viewer writes kv")?;
    assert!(err.contains("user/viewer may not update kv"), "{err}");

    // The edit user works in a, with secrets too...
    ok(&as_user(&editor, None, &["apply", "-f", mine.to_str().unwrap()]), "editor applies in a")?;
    let secret_value = "s3cr3t-value-that-must-never-be-logged";
    let secret_file = root.join("secret.txt");
    std::fs::write(&secret_file, secret_value)?;
    ok(
        &as_user(
            &editor,
            None,
            &["secret", "create", "db-pass", "--from-file", secret_file.to_str().unwrap(), "-n", "a"],
        ),
        "editor creates a secret in a",
    )?;
    // ...but creates no token.
    let err = refused(&as_user(&editor, None, &["token", "create"]), "editor creates a token")?;
    assert!(err.contains("user/editor may not create tokens"), "{err}");

    // No one writes /berth/ through KV, not even a cluster-admin.
    let err = refused(&as_user(&admin, None, &["kv", "put", "/berth/tokens/forged", "x"]), "root writes /berth/")?;
    assert!(err.contains("berth's own records"), "{err}");
    // Only a cluster-admin reads it.
    ok(&as_user(&admin, None, &["kv", "get", "/berth/users/", "--prefix"]), "root reads /berth/")?;
    let reader_role = root.join("reader.yaml");
    std::fs::write(
        &reader_role,
        "kind: Role\nmetadata: {name: kv-reader}\nspec:\n  rules:\n    - {verbs: [get, list, watch], resources: [kv]}\n\
         ---\nkind: RoleBinding\nmetadata: {name: editor-kv}\nspec: {role: kv-reader, users: [editor]}\n",
    )?;
    // The edit user may not grant itself more.
    let err = refused(&as_user(&editor, None, &["apply", "-f", reader_role.to_str().unwrap()]), "editor binds")?;
    assert!(err.contains("may not create roles"), "{err}");
    berth_ok(&c, &["apply", "-f", reader_role.to_str().unwrap()])?;
    berth_ok(&c, &["kv", "put", "app/x", "1"])?;
    let mut last = String::new();
    let read = wait_for(Duration::from_secs(5), "the kv-reader binding applies", || {
        let out = as_user(&editor, None, &["kv", "get", "app/x"]);
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success().then_some(())
    });
    assert!(read.is_ok(), "the editor reads KV once bound to kv-reader: {last}");
    let err = refused(&as_user(&editor, None, &["kv", "get", "/berth/", "--prefix"]), "editor reads /berth/")?;
    assert!(err.contains("user/editor may not read") && err.contains("cluster-admin"), "{err}");
    let roles = berth_ok(&c, &["role", "ls"])?;
    assert!(roles.contains("kv-reader") && roles.contains("editor-kv") && roles.contains("built-in"), "{roles}");

    // The audit log holds each attempt, refused ones included, and each change with its revision.
    let v = wait_for(Duration::from_secs(5), "the viewer's refusals in the audit log", || {
        let v = audit_of(&c, "user/viewer").ok()?;
        (has_record(&v, "list", "services", "denied") && has_record(&v, "create", "services", "denied")).then_some(v)
    })?;
    assert!(has_record(&v, "update", "kv", "denied"), "{v:?}");
    let e = wait_for(Duration::from_secs(5), "the editor's records", || {
        let e = audit_of(&c, "user/editor").ok()?;
        has_record(&e, "create", "tokens", "denied").then_some(e)
    })?;
    let applied = e.iter().find(|r| r["verb"] == "update" && r["resource"] == "services" && r["outcome"] == "ok");
    assert!(applied.is_some_and(|r| r["revision"].as_i64().unwrap_or(0) > 0), "the apply with its revision: {e:?}");
    assert!(has_record(&e, "update", "secrets", "ok"), "{e:?}");
    let r = wait_for(Duration::from_secs(5), "root's refused KV write", || {
        let r = audit_of(&c, "user/root").ok()?;
        has_record(&r, "update", "kv", "error").then_some(r)
    })?;
    assert!(r.iter().any(|x| x["name"] == "/berth/tokens/forged"), "{r:?}");
    let everything = berth_ok(&c, &["audit", "-o", "json"])?;
    assert!(!everything.contains(secret_value), "a secret's value is in the audit log");
    assert!(everything.contains("\"identity\":\"admin/admin\""), "the admin's own calls are there too");
    // Each master writes it as JSON lines, numbered by `seq` in the order applied: the same
    // record under the same number on every master.
    let mut by_seq = std::collections::BTreeMap::<u64, String>::new();
    for m in c.masters.values() {
        let file = m.data_dir.join("audit.log");
        let text = wait_for(Duration::from_secs(10), &format!("master {}'s audit.log", m.id), || {
            let t = std::fs::read_to_string(&file).ok()?;
            t.contains("/berth/tokens/forged").then_some(t)
        })?;
        assert!(!text.contains(secret_value), "a secret's value is in {}", file.display());
        let mut last = None;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let seq = v["seq"].as_u64().ok_or_else(|| anyhow::anyhow!("no seq in {line}"))?;
            assert!(last.is_none_or(|l| seq == l + 1), "master {}: seq {seq} after {last:?}", m.id);
            last = Some(seq);
            let first = by_seq.entry(seq).or_insert_with(|| line.to_string());
            assert_eq!(first, line, "master {} has another record under seq {seq}", m.id);
        }
    }
    // `berth audit -f` goes on with every record committed after it started, through any
    // master: a write through one master shows up on a follow of another.
    let mut follow = std::process::Command::new(berth_tests::berth_bin())
        .args(["audit", "-f", "-o", "json", "--identity", "admin/admin", "--endpoints", &c.masters[&1].endpoint])
        .envs(berth_tests::admin_env(&c.pki_dir()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = follow.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let followed = wait_for(Duration::from_secs(10), "a write through master 3 in `audit -f` on master 1", || {
        c.berth_at(&c.masters[&3].endpoint, &["kv", "put", "app/followed", "1"]);
        rx.try_iter().find(|l| l.contains("app/followed"))
    });
    let _ = follow.kill();
    let _ = follow.wait();
    let followed: serde_json::Value = serde_json::from_str(&followed?)?;
    assert_eq!((followed["verb"].as_str(), followed["outcome"].as_str()), (Some("update"), Some("ok")), "{followed}");
    // A namespace admin reads its namespace's records only.
    berth_ok(&c, &["user", "add", "boss", "--role", "admin", "-n", "a", "--out", creds("boss").to_str().unwrap()])?;
    let recs = wait_for(Duration::from_secs(5), "the boss reads the audit", || {
        let out = as_user(&creds("boss"), None, &["audit", "-o", "json"]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    assert!(recs.contains("\"namespace\":\"a\"") && !recs.contains("\"namespace\":\"b\""), "{recs}");
    assert!(!recs.contains("tokens"), "cluster records stay with cluster-admins: {recs}");

    // Removing a user revokes its certificate: every master refuses it within a second.
    let endpoints: Vec<String> = c.masters.values().map(|m| m.endpoint.clone()).collect();
    for ep in &endpoints {
        ok(&as_user(&viewer, Some(ep), &["get", "services", "-n", "a"]), "viewer before removal")?;
    }
    let out = berth_ok(&c, &["user", "rm", "viewer"])?;
    assert!(out.contains("certificates revoked") && out.contains("user-viewer"), "{out}");
    let removed = Instant::now();
    for ep in &endpoints {
        let err = wait_for(Duration::from_secs(5), &format!("the removed viewer refused at {ep}"), || {
            let out = as_user(&viewer, Some(ep), &["get", "services", "-n", "a"]);
            (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
        })?;
        assert!(err.contains("revoked") || err.contains("no such user"), "{err}");
    }
    let took = removed.elapsed();
    eprintln!(
        "a removed user: refused by all {} masters {:.0} ms after `user rm`",
        endpoints.len(),
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(1), "the removed user was still accepted {took:?} after");
    let users = berth_ok(&c, &["user", "ls"])?;
    assert!(!users.contains("viewer"), "{users}");

    // A user added through one master is allowed at once by the others: a master that has not
    // applied the binding yet reads it again before it refuses (regression: a benchmark's first
    // write through a follower was refused with "there is no such user").
    for i in 0..5 {
        let name = format!("fresh{i}");
        let dir = creds(&name);
        let args = ["user", "add", name.as_str(), "--role", "edit", "-n", "a", "--out", dir.to_str().unwrap()];
        let out = c.berth_at(&endpoints[0], &args);
        ok(&out, "user add through the first master")?;
        for ep in &endpoints[1..] {
            ok(&as_user(&dir, Some(ep), &["get", "services", "-n", "a"]), "a new user's first call")?;
        }
    }
    Ok(())
}

fn service_with(ns: &str, name: &str, replicas: u32, cpu: &str) -> String {
    format!(
        "kind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  task:\n    runtime: process\n    command: [sleep, '3600']\n    resources: {{cpu: {cpu}}}\n"
    )
}

// A namespace's quota holds at apply, at scale and at secret creation, with an error that gives
// the usage and the limit; `get namespaces` shows usage against quota; a tenant cannot raise
// its own quota; the refusals are audited.
#[test]
fn namespace_quotas_hold_at_apply_scale_and_secret_create() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    c.wait_leader(Duration::from_secs(10))?;
    let root = c.dir.path().to_path_buf();
    let apply = |name: &str, yaml: &str| -> Output {
        let f = root.join(format!("{name}.yaml"));
        std::fs::write(&f, yaml).expect("writing a spec");
        c.berth(&["apply", "-f", f.to_str().unwrap()])
    };
    let ns = "kind: Namespace\nmetadata: {name: shop}\nspec:\n  quota: {cpu: 1, tasks: 3, services: 2, secrets: 1}\n";
    ok(&apply("ns", ns), "the namespace")?;
    ok(&apply("web", &service_with("shop", "web", 2, "250m")), "web within the quota")?;
    let err = refused(&apply("api", &service_with("shop", "api", 2, "250m")), "api past the task quota")?;
    assert!(err.contains("namespace shop's quota: tasks would be 4 (now 2), over the quota of 3"), "{err}");
    let err = refused(&apply("big", &service_with("shop", "big", 1, "1")), "big past the CPU quota")?;
    assert!(err.contains("cpu would be 1500m (now 500m), over the quota of 1000m"), "{err}");
    let err = refused(&c.berth(&["scale", "web=4", "-n", "shop"]), "scaling past the quota")?;
    assert!(err.contains("tasks would be 4 (now 2)"), "{err}");
    ok(&c.berth(&["scale", "web=3", "-n", "shop"]), "scaling to the quota")?;
    // Other namespaces have no quota.
    ok(&apply("free", &service_with("default", "free", 50, "1")), "a namespace without a quota")?;
    let value = root.join("v.txt");
    std::fs::write(&value, "x")?;
    ok(&c.berth(&["secret", "create", "one", "--from-file", value.to_str().unwrap(), "-n", "shop"]), "a first secret")?;
    let err = refused(
        &c.berth(&["secret", "create", "two", "--from-file", value.to_str().unwrap(), "-n", "shop"]),
        "secret 2",
    )?;
    assert!(err.contains("secrets would be 2 (now 1), over the quota of 1"), "{err}");
    // A new version of an existing secret is not one more.
    ok(
        &c.berth(&["secret", "update", "one", "--from-file", root.join("ns.yaml").to_str().unwrap(), "-n", "shop"]),
        "update",
    )?;

    let list = berth_ok(&c, &["get", "namespaces", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&list)?;
    let shop = v.as_array().and_then(|a| a.iter().find(|n| n["name"] == "shop")).cloned().unwrap_or_default();
    assert_eq!(shop["usage"]["tasks"], 3, "{list}");
    assert_eq!(shop["quota"]["tasks"], 3, "{list}");
    assert_eq!(shop["usage"]["cpu"], 750, "{list}");
    let table = berth_ok(&c, &["get", "namespaces"])?;
    assert!(table.contains("3/3") && table.contains("750m/1000m"), "{table}");

    // A tenant admin cannot raise its own quota.
    let boss = root.join("users/boss");
    berth_ok(&c, &["user", "add", "boss", "--role", "admin", "-n", "shop", "--out", boss.to_str().unwrap()])?;
    let raise = root.join("raise.yaml");
    std::fs::write(&raise, ns.replace("tasks: 3", "tasks: 300"))?;
    let err = refused(&as_user(&boss, None, &["apply", "-f", raise.to_str().unwrap()]), "the boss raises its quota")?;
    assert!(err.contains("user/boss may not create namespaces"), "{err}");
    // The boss sees its namespace, not the others.
    let mine = ok(&as_user(&boss, None, &["get", "namespaces", "-o", "json"]), "the boss lists namespaces")?;
    assert!(mine.contains("\"shop\"") && !mine.contains("\"default\""), "{mine}");
    let recs = wait_for(Duration::from_secs(5), "the refused apply in the audit log", || {
        let r = audit_of(&c, "admin/admin").ok()?;
        r.iter()
            .any(|x| x["outcome"].as_str().is_some_and(|o| o.contains("ResourceExhausted") && o.contains("shop")))
            .then_some(())
    });
    assert!(recs.is_ok(), "the quota refusal is audited");
    Ok(())
}
