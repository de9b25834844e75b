//! Task start latency of the runtimes side by side, in one run, on the same image and command:
//! berth `process`, berth `oci`, berth `docker`, the OCI runtime (runc) called directly on a
//! bundle like berth's, and `docker run` called directly. Then a cold pull and unpack of the
//! test image from a local registry, berth next to `docker pull`; then the memory of 100 oci
//! tasks. Prints a table and, last, one JSON line.
//!
//! Run as root with Docker, docker-registry, runc and tini (deploy/sandbox-prereqs.sh) and the
//! test image (deploy/test-image.sh):
//!
//! ```sh
//! cargo run -p berth-agent --release --example bench-runtimes -- [--iterations 30] [--tasks 100]
//! ```
//!
//! Latency is from the start call to the task's first line of output (the program ran), read
//! the way each does it: berth's runtimes through their logs API, runc and `docker run` through
//! their own stdout.

#[path = "../tests/registry/mod.rs"]
mod registry;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_agent::driver::docker::DockerRuntime;
use berth_agent::driver::process::ProcessRuntime;
use berth_agent::driver::runtime::{LogQuery, Runtime};
use berth_agent::image::Images;
use berth_types::spec::{Runtime as Kind, TaskSpec};
use berth_types::task::RunSpec;
use futures::StreamExt;

const LINE: &str = "bench-up";

fn spec(kind: Kind, image: Option<&str>, argv: &[&str]) -> RunSpec {
    let task = TaskSpec {
        image: image.map(str::to_string),
        stop_grace_period: Duration::from_secs(1),
        ..TaskSpec::new(kind, argv)
    };
    RunSpec::standalone("bench", task)
}

/// Starts `spec` as `id` and returns the time until its first output line.
async fn berth_start(rt: &impl Runtime, id: &str, spec: &RunSpec) -> Duration {
    let began = Instant::now();
    rt.start(id, spec).await.unwrap_or_else(|e| panic!("start {id}: {e}"));
    let mut lines = rt.logs(id, LogQuery { follow: true, ..Default::default() }).await.unwrap();
    while let Some(l) = lines.next().await {
        if l.line == LINE {
            return began.elapsed();
        }
    }
    panic!("{id} ended without printing {LINE}");
}

async fn berth_end(rt: &impl Runtime, id: &str) {
    let _ = rt.stop(id, Duration::from_secs(1)).await;
    let _ = rt.remove(id).await;
}

/// Runs `program args` and returns the time until it prints [`LINE`]; then kills it and runs
/// `cleanup`.
fn direct(program: &str, args: &[String], cleanup: impl FnOnce()) -> Duration {
    let began = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("{program} ended without printing {LINE}");
        }
        if line.trim() == LINE {
            break;
        }
    }
    let took = began.elapsed();
    cleanup();
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pids_named(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
        })
        .collect()
}

fn main() {
    // This program is also its tasks' shim (as the berth binary is): `bench-runtimes task-shim DIR`.
    let mut argv = std::env::args_os();
    if argv.nth(1).is_some_and(|a| a == "task-shim") {
        std::process::exit(berth_agent::driver::process::shim_main(argv.collect()));
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(bench());
}

async fn bench() {
    berth_pki::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default)
    };
    let iterations = flag("--iterations", 30);
    let tasks = flag("--tasks", 100);

    let mut reg = registry::Registry::start();
    let image = reg.push(registry::TEST_IMAGE, "bench/busybox:1");
    let tmp = tempfile::Builder::new().prefix("berth-bench-rt-").tempdir().unwrap();
    let shim: Vec<OsString> = ProcessRuntime::default_shim();
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let rt = ProcessRuntime::new(tmp.path().join("tasks"), shim)
        .with_cgroup_parent("berth-bench")
        .with_images(images.clone());
    let docker = DockerRuntime::connect().await.expect("docker");
    images.ensure(&image, None, &|_| {}).await.expect("pull");

    let script = format!("echo {LINE}; exec sleep 1000");
    let process_spec = spec(Kind::Process, None, &["/bin/sh", "-c", &script]);
    let oci_spec = spec(Kind::Oci, Some(&image), &["/bin/busybox", "sh", "-c", &script]);
    let docker_spec = spec(Kind::Docker, Some(registry::TEST_IMAGE), &["/bin/busybox", "sh", "-c", &script]);

    // The bundle of a berth oci task, run by runc directly (same config, same overlay root).
    let probe_id = "bench-bundle";
    berth_start(&rt, probe_id, &oci_spec).await;
    let bundle_src = tmp.path().join("tasks").join(probe_id).join("bundle/config.json");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&bundle_src).unwrap()).unwrap();
    let runc = berth_agent::sandbox::find_oci_runtime(None).unwrap();

    let mut results: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for i in 0..iterations {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let id = format!("bench-p-{i}");
        results.entry("berth process").or_default().push(ms(berth_start(&rt, &id, &process_spec).await));
        berth_end(&rt, &id).await;
        let id = format!("bench-o-{i}");
        results.entry("berth oci").or_default().push(ms(berth_start(&rt, &id, &oci_spec).await));
        berth_end(&rt, &id).await;
        let id = format!("bench-d-{i}");
        results.entry("berth docker").or_default().push(ms(berth_start(&docker, &id, &docker_spec).await));
        berth_end(&docker, &id).await;
        // runc on a copy of the berth task's bundle (its overlay root stays mounted).
        let bundle = tmp.path().join(format!("direct-{i}"));
        std::fs::create_dir_all(&bundle).unwrap();
        let mut c = config.clone();
        c["linux"]["cgroupsPath"] = serde_json::json!(format!("/berth-bench/direct-{i}"));
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
        let state = tmp.path().join("runc-state");
        let id = format!("direct-{i}");
        let run_args: Vec<String> = vec![
            "--root".into(),
            state.display().to_string(),
            "run".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            id.clone(),
        ];
        let kill_state = state.clone();
        let runc2 = runc.clone();
        results.entry("runc run (direct)").or_default().push(ms(direct(
            &runc.display().to_string(),
            &run_args,
            move || {
                let _ = Command::new(&runc2)
                    .args(["--root", &kill_state.display().to_string(), "kill", &id, "KILL"])
                    .stderr(Stdio::null())
                    .status();
            },
        )));
        let name = format!("bench-direct-{i}");
        let docker_args: Vec<String> =
            ["run", "--rm", "--name", &name, registry::TEST_IMAGE, "/bin/busybox", "sh", "-c", &script]
                .iter()
                .map(|s| s.to_string())
                .collect();
        results.entry("docker run (direct)").or_default().push(ms(direct("docker", &docker_args, || {
            let _ =
                Command::new("docker").args(["rm", "-f", &name]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        })));
    }
    berth_end(&rt, probe_id).await;

    println!("task start latency, {iterations} starts each (ms, start call to first output line):");
    println!("{:<22} {:>8} {:>8}", "runtime", "p50", "p99");
    let mut json = serde_json::Map::new();
    for (name, v) in results.iter_mut() {
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        println!("{name:<22} {p50:>8.1} {p99:>8.1}");
        json.insert(name.to_string(), serde_json::json!({"p50_ms": p50, "p99_ms": p99}));
    }
    let p50 = |k: &str| json[k]["p50_ms"].as_f64().unwrap();
    println!(
        "berth oci / runc direct: {:.2}x; berth oci / docker run: {:.2}x",
        p50("berth oci") / p50("runc run (direct)"),
        p50("berth oci") / p50("docker run (direct)")
    );

    // Cold pull + unpack from the local registry: berth's store vs docker pull.
    let mut berth_pull = Vec::new();
    let mut docker_pull = Vec::new();
    for i in 0..5 {
        let store = Images::new(tmp.path().join(format!("cold-{i}")), Vec::new(), u64::MAX);
        let began = Instant::now();
        store.ensure(&image, None, &|_| {}).await.unwrap();
        berth_pull.push(began.elapsed().as_secs_f64() * 1000.0);
        let _ = Command::new("docker").args(["rmi", "-f", &image]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let began = Instant::now();
        let ok = Command::new("docker").args(["pull", "-q", &image]).stdout(Stdio::null()).status().unwrap().success();
        assert!(ok, "docker pull");
        docker_pull.push(began.elapsed().as_secs_f64() * 1000.0);
    }
    let (bp, dp) = (percentile(&mut berth_pull, 0.5), percentile(&mut docker_pull, 0.5));
    println!("cold pull + unpack of {image} (p50 of 5, ms): berth {bp:.1}, docker pull {dp:.1}");
    json.insert("pull_cold_p50_ms".into(), serde_json::json!({"berth": bp, "docker pull": dp}));

    // Memory: this process (the runtime and image store an agent holds) and the per-task
    // processes, with `tasks` oci tasks running.
    let me = std::process::id();
    let before = rss_kib(me);
    let ids: Vec<String> = (0..tasks).map(|i| format!("bench-mem-{i}")).collect();
    for id in &ids {
        berth_start(&rt, id, &oci_spec).await;
    }
    let after = rss_kib(me);
    let shims: u64 = pids_named("bench-runtimes task-shim").iter().map(|&p| rss_kib(p)).sum();
    let runcs: u64 = pids_named(" run --bundle").iter().map(|&p| rss_kib(p)).sum();
    println!(
        "{tasks} oci tasks: runtime process RSS {} -> {} KiB; shims {} KiB ({} KiB each); runc run processes {} KiB",
        before,
        after,
        shims,
        shims / tasks.max(1) as u64,
        runcs
    );
    json.insert(
        "memory_kib".into(),
        serde_json::json!({"tasks": tasks, "runtime_before": before, "runtime_after": after, "shims": shims, "runc": runcs}),
    );
    for id in &ids {
        berth_end(&rt, id).await;
    }
    println!("{}", serde_json::Value::Object(json));
}
