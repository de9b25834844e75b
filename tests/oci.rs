//! `runtime: oci` end to end: real masters and agents, a real registry (`docker-registry` on
//! loopback, requiring credentials) holding the test image, pulled by each agent with the
//! credentials of a berth secret and run sandboxed by runc. What the pull did shows in the
//! task's status (`describe`); an image that cannot be pulled fails its task with the reason,
//! and the restart policy tries again.

#[path = "../crates/agent/tests/registry/mod.rs"]
mod registry;

use std::time::Duration;

use anyhow::Result;
use berth_tests::{Cluster, apply, berth_ok, cluster_with_agents, is_root, tasks, wait_for};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn running(c: &Cluster, service: &str) -> Vec<Value> {
    tasks(c, service)
        .into_iter()
        .filter(|t| t["state"] == "running" && t["desired_state"] == "running" && t["pid"].as_i64().unwrap_or(0) > 0)
        .collect()
}

#[test]
fn an_oci_service_pulls_its_image_with_a_secret_and_runs_three_replicas() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: oci tasks need root (overlayfs, runc)");
        return Ok(());
    }
    let mut reg = registry::Registry::start_with_auth("puller", "pull-pw");
    let image = reg.push(registry::TEST_IMAGE, "apps/busybox:1");
    let (c, _agents) = cluster_with_agents(&[("n1", "a"), ("n2", "b"), ("n3", "c")], &[])?;
    let dir = c.dir.path().to_path_buf();
    let cred = dir.join("regcred");
    std::fs::write(&cred, "puller:pull-pw")?;
    berth_ok(&c, &["secret", "create", "regcred", "--from-file", &cred.to_string_lossy()])?;

    let svc = format!(
        "kind: Service\nmetadata: {{name: app}}\nspec:\n  replicas: 3\n  placement: {{max_replicas_per_node: 1}}\n  task:\n    \
         runtime: oci\n    image: {image}\n    image_pull_secret: regcred\n    command: [/bin/busybox, sh, -c, \"echo up as \
         $(/bin/busybox id -u); exec /bin/busybox sleep 100000\"]\n"
    );
    apply(&c, &dir, "app", &svc)?;
    let tasks3 = wait_for(LONG, "3 running oci tasks", || {
        let r = running(&c, "app");
        (r.len() == 3).then_some(r)
    })?;
    for t in &tasks3 {
        let m = t["message"].as_str().unwrap_or_default();
        assert!(m.contains("pulled image") && m.contains("apps/busybox:1") && m.contains("sha256:"), "{t}");
    }
    let described = berth_ok(&c, &["describe", "service", "app"])?;
    assert!(described.contains("running; pulled image"), "{described}");
    let logs = berth_ok(&c, &["logs", "app"])?;
    assert_eq!(logs.matches("up as 65534").count(), 3, "{logs}");

    // A tag the registry does not have: the task fails with the reason, and is tried again.
    let bad = svc
        .replace("name: app", "name: bad")
        .replace("apps/busybox:1", "apps/busybox:nope")
        .replace("replicas: 3", "replicas: 1");
    let bad = bad.replace("  task:\n", "  restart: {condition: any, delay: 200ms}\n  task:\n");
    apply(&c, &dir, "bad", &bad)?;
    // Each replacement names the attempt that failed and why.
    let retried = wait_for(LONG, "a second attempt of bad, after a failed pull", || {
        tasks(&c, "bad").into_iter().find_map(|t| {
            let m = t["message"].as_str().unwrap_or_default().to_string();
            let attempt: u32 = m.strip_prefix("restart ")?.split_whitespace().next()?.parse().ok()?;
            (attempt >= 2).then_some(m)
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}; its tasks: {:#}", Value::Array(tasks(&c, "bad"))))?;
    assert!(retried.contains("pulling image") && retried.contains("apps/busybox:nope"), "{retried}");
    assert!(retried.contains("manifest unknown"), "{retried}");
    Ok(())
}

/// Air-gapped: no registry at all. `berth image import` loads a `docker save` archive into the
/// cluster; each node running a task of it fetches the image from the leader, checked against
/// its digests, and the task runs sandboxed as usual. `berth image rm` removes it again.
#[test]
fn an_image_imported_into_the_cluster_runs_on_every_node_without_a_registry() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: oci tasks need root (overlayfs, runc)");
        return Ok(());
    }
    registry::ensure_test_image();
    let (c, _agents) = cluster_with_agents(&[("n1", "a"), ("n2", "b")], &[])?;
    let dir = c.dir.path().to_path_buf();
    let archive = dir.join("image.tar");
    let saved =
        std::process::Command::new("docker").args(["save", "-o"]).arg(&archive).arg(registry::TEST_IMAGE).status()?;
    assert!(saved.success(), "docker save {}", registry::TEST_IMAGE);

    let imported = berth_ok(&c, &["image", "import", &archive.to_string_lossy()])?;
    let full = format!("docker.io/{}", registry::TEST_IMAGE);
    assert!(imported.contains(&format!("imported {full}")) && imported.contains("into the cluster"), "{imported}");
    let listed: Value = serde_json::from_str(&berth_ok(&c, &["image", "ls", "-o", "json"])?)?;
    assert_eq!(listed[0]["reference"], full.as_str(), "{listed}");
    // Importing again sends nothing new and records the same image.
    let again = c.berth(&["image", "import", &archive.to_string_lossy()]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("holds it already"));

    // Named as short as users write it: the masters match it to the full reference.
    let svc = format!(
        "kind: Service\nmetadata: {{name: offline}}\nspec:\n  replicas: 2\n  placement: {{max_replicas_per_node: 1}}\n  \
         task:\n    runtime: oci\n    image: {}\n    command: [/bin/busybox, sh, -c, \"echo offline up; exec /bin/busybox \
         sleep 100000\"]\n",
        registry::TEST_IMAGE
    );
    apply(&c, &dir, "offline", &svc)?;
    let up = wait_for(LONG, "2 running oci tasks from the cluster's image", || {
        let r = running(&c, "offline");
        (r.len() == 2).then_some(r)
    })
    .map_err(|e| anyhow::anyhow!("{e}; its tasks: {:#}", Value::Array(tasks(&c, "offline"))))?;
    for t in &up {
        let m = t["message"].as_str().unwrap_or_default();
        assert!(m.contains("from the cluster") && m.contains(&full), "{t}");
    }
    let nodes: std::collections::BTreeSet<&str> = up.iter().filter_map(|t| t["node_name"].as_str()).collect();
    assert_eq!(nodes.len(), 2, "one task per node: {up:?}");
    let logs = berth_ok(&c, &["logs", "offline"])?;
    assert_eq!(logs.matches("offline up").count(), 2, "{logs}");

    // A reference the cluster does not hold is refused by name; a held one is removed.
    let missing = c.berth(&["image", "rm", "nosuch/image:1"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("holds no image docker.io/nosuch/image:1"));
    let removed = berth_ok(&c, &["image", "rm", registry::TEST_IMAGE])?;
    assert!(removed.contains(&format!("removed {full}")), "{removed}");
    let listed: Value = serde_json::from_str(&berth_ok(&c, &["image", "ls", "-o", "json"])?)?;
    assert_eq!(listed, serde_json::json!([]));
    Ok(())
}

/// The masters check what they are sent, whatever the client: a blob that does not match its
/// digest, or one cut short, is refused and leaves no chunk behind; an image whose layers are
/// not stored is not recorded.
#[test]
fn the_masters_refuse_corrupt_blobs_and_images_without_their_layers() -> Result<()> {
    use berth_api::pb::{
        ImageBlobChunk, PutImageRequest, agent::ClusterImageLayer, control_service_client::ControlServiceClient,
    };
    use sha2::Digest as _;

    let c = Cluster::start(3, &[])?;
    c.wait_leader(Duration::from_secs(60))?;
    berth_pki::tls::install_crypto_provider();
    let pki = c.pki_dir();
    let read = |f: &str| std::fs::read_to_string(pki.join(f));
    let files = berth_pki::tls::TlsFiles {
        ca_pem: read("ca.crt")?,
        cert: berth_pki::CertifiedKey { cert_pem: read("admin.crt")?, key_pem: read("admin.key")? },
    };
    let endpoint = c.endpoints().split(',').next().unwrap_or_default().to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let first_digest = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("https://{endpoint}"))?
            .tls_config(berth_master::client_tls(&files))?
            .connect()
            .await?;
        let mut client = ControlServiceClient::new(ch);
        // 1.5 MiB, so it spans several stored chunks before the mismatch is found at its end.
        let data: Vec<u8> = (0..1_572_864u32).map(|i| (i % 251) as u8).collect();
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
        let chunks = |data: Vec<u8>, size: u64| {
            let parts: Vec<ImageBlobChunk> = data
                .chunks(400_000)
                .enumerate()
                .map(|(i, d)| ImageBlobChunk {
                    digest: if i == 0 { digest.clone() } else { String::new() },
                    data: d.to_vec(),
                    size: if i == 0 { size } else { 0 },
                })
                .collect();
            futures::stream::iter(parts)
        };
        let mut corrupt = data.clone();
        corrupt[1_000_000] ^= 0xff;
        let e = client.put_image_blob(chunks(corrupt, data.len() as u64)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("corrupted or cut off"), "{e}");
        let short = data[..900_000].to_vec();
        let e = client.put_image_blob(chunks(short, data.len() as u64)).await.unwrap_err();
        assert!(e.message().contains("corrupted or cut off"), "{e}");

        let layer = ClusterImageLayer {
            digest: digest.clone(),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            size: data.len() as u64,
        };
        let image = PutImageRequest {
            references: vec!["t/app:1".into()],
            digest: format!("sha256:{}", "1".repeat(64)),
            config_json: "{}".into(),
            layers: vec![layer],
        };
        let e = client.put_image(image.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("is not stored in the cluster"), "{e}");

        // The whole blob is kept, and then the image is recorded under its full reference.
        let ok = client.put_image_blob(chunks(data.clone(), data.len() as u64)).await?.into_inner();
        assert!(!ok.existed && ok.size == data.len() as u64, "{ok:?}");
        let again = client.put_image_blob(chunks(data.clone(), data.len() as u64)).await?.into_inner();
        assert!(again.existed, "{again:?}");
        let rec = client.put_image(image.clone()).await?.into_inner();
        assert_eq!(rec.images[0].reference, "docker.io/t/app:1");

        // The tag moves to another image: the blob only the old one used goes with it.
        let other: Vec<u8> = b"another layer".to_vec();
        let other_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&other)));
        let send = vec![ImageBlobChunk { digest: other_digest.clone(), data: other.clone(), size: other.len() as u64 }];
        client.put_image_blob(futures::stream::iter(send)).await?;
        let mut moved = image.clone();
        moved.digest = format!("sha256:{}", "2".repeat(64));
        moved.layers[0].digest = other_digest.clone();
        moved.layers[0].size = other.len() as u64;
        client.put_image(moved).await?;
        anyhow::Ok(digest)
    })?;
    let blobs: Vec<String> = c.get_prefix("/berth/images/blobs/")?.into_keys().collect();
    assert_eq!(blobs.len(), 1, "only the moved tag's blob stays: {blobs:?}");
    assert!(!blobs[0].ends_with(first_digest.trim_start_matches("sha256:")), "{blobs:?}");
    // One chunk and the marker of the remaining blob's upload; the refused uploads' partial
    // chunks (removed just after their refusal) and the removed blob's are gone.
    let keys = wait_for(Duration::from_secs(30), "the refused uploads' chunks removed", || {
        let keys: Vec<String> = c.get_prefix("/berth/images/chunks/").ok()?.into_keys().collect();
        (keys.len() == 2).then_some(keys)
    })?;
    assert_eq!(keys.iter().filter(|k| k.ends_with("/marker")).count(), 1, "{keys:?}");
    Ok(())
}
