//! Storage commands: `berth get volumes`, `berth describe volume NAME`, `berth delete volume
//! NAME...`, and `berth secret|config create|update|ls|rm`. No command ever prints a secret's
//! value.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use berth_api::pb::{self, FileKind, VolumeView};
use berth_types::spec::{self, VolumeSpec};
use clap::Subcommand;
use serde::Serialize;
use tonic::Code;

use crate::{
    Global,
    client::{Call, Client},
    cmd_services::{fmt_age, key, node_names, now_ms, out_line, status_text, task_state_name},
    output::{self, human_bytes},
};

/// One volume as `get`/`describe` print it (and `-o json|yaml`).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct VolumeOut {
    pub namespace: String,
    pub name: String,
    pub driver: String,
    pub access: String,
    /// Enforced size in bytes (local volumes with `size`).
    pub size_bytes: Option<u64>,
    /// Where the data is: a node (local), a host path, or `server:/volume` (glusterfs).
    pub location: String,
    pub node: String,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub usage_at_ms: i64,
    pub created_by_service: String,
    pub services: Vec<String>,
    pub tasks: Vec<VolumeTaskOut>,
    pub created_at_ms: i64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct VolumeTaskOut {
    pub task: String,
    pub service: String,
    pub node: String,
    pub state: String,
    pub target: String,
    pub read_only: bool,
}

impl VolumeOut {
    pub fn from_view(v: &VolumeView, names: &HashMap<String, String>) -> VolumeOut {
        let r = v.record.clone().unwrap_or_default();
        let node = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
        let spec: Option<VolumeSpec> = serde_json::from_str(&r.spec_json).ok();
        let (driver, access, size, location) = match &spec {
            Some(s) => {
                let location = match s.driver {
                    spec::VolumeDriver::Local => String::new(),
                    spec::VolumeDriver::Host => s.path.clone().unwrap_or_default(),
                    spec::VolumeDriver::Glusterfs => {
                        format!("{}:/{}", s.servers.join(","), s.volume.clone().unwrap_or_default())
                    }
                };
                (s.driver.to_string(), s.access.to_string(), s.size.map(|m| m.bytes()), location)
            }
            None => ("?".into(), "?".into(), None, String::new()),
        };
        VolumeOut {
            namespace: r.namespace,
            name: r.name,
            driver,
            access,
            size_bytes: size,
            location,
            node: if r.node_id.is_empty() { String::new() } else { node(&r.node_id) },
            used_bytes: r.used_bytes,
            capacity_bytes: r.capacity_bytes,
            usage_at_ms: r.usage_at_ms,
            created_by_service: r.created_by_service,
            services: v.services.clone(),
            tasks: v
                .tasks
                .iter()
                .map(|t| VolumeTaskOut {
                    task: t.task_id.clone(),
                    service: t.service.clone(),
                    node: if t.node_id.is_empty() { String::new() } else { node(&t.node_id) },
                    state: task_state_name(t.state).to_string(),
                    target: t.target.clone(),
                    read_only: t.read_only,
                })
                .collect(),
            created_at_ms: r.created_at_ms,
        }
    }

    fn size_text(&self) -> String {
        self.size_bytes.map_or_else(|| "-".to_string(), human_bytes)
    }

    fn usage_text(&self) -> String {
        if self.usage_at_ms == 0 {
            return "-".into();
        }
        format!("{} of {}", human_bytes(self.used_bytes), human_bytes(self.capacity_bytes))
    }
}

pub const VOLUME_HEADERS: &[&str] = &["NAMESPACE", "NAME", "DRIVER", "ACCESS", "NODE", "SIZE", "USED", "TASKS", "AGE"];

pub fn volume_rows(volumes: &[VolumeOut], now: i64) -> Vec<Vec<String>> {
    volumes
        .iter()
        .map(|v| {
            vec![
                v.namespace.clone(),
                v.name.clone(),
                v.driver.clone(),
                v.access.clone(),
                if v.node.is_empty() { "-".into() } else { v.node.clone() },
                v.size_text(),
                v.usage_text(),
                v.tasks.len().to_string(),
                fmt_age(now - v.created_at_ms),
            ]
        })
        .collect()
}

pub fn describe_lines(v: &VolumeOut) -> Vec<String> {
    let mut l = vec![
        format!("Volume:    {}", key(&v.namespace, &v.name)),
        format!("Driver:    {}", v.driver),
        format!("Access:    {}", v.access),
    ];
    if !v.location.is_empty() {
        l.push(format!("Location:  {}", v.location));
    }
    if v.driver == "local" {
        l.push(format!(
            "Node:      {}",
            if v.node.is_empty() { "none yet (the node of the first task that uses it)" } else { v.node.as_str() }
        ));
    }
    l.push(format!("Size:      {}", v.size_bytes.map_or_else(|| "not enforced".to_string(), human_bytes)));
    l.push(format!("Usage:     {}", if v.usage_at_ms == 0 { "not reported yet".into() } else { v.usage_text() }));
    if !v.created_by_service.is_empty() {
        l.push(format!("Created:   by a per-slot mount of service {}", v.created_by_service));
    }
    l.push(format!("Services:  {}", if v.services.is_empty() { "none".to_string() } else { v.services.join(", ") }));
    if v.tasks.is_empty() {
        l.push("Tasks:     none".into());
    } else {
        l.push(String::new());
        l.push("Tasks:".into());
        let rows: Vec<Vec<String>> = v
            .tasks
            .iter()
            .map(|t| {
                let target = if t.read_only { format!("{} (ro)", t.target) } else { t.target.clone() };
                vec![t.task.clone(), t.service.clone(), t.node.clone(), t.state.clone(), target]
            })
            .collect();
        l.push(output::render_table(&["TASK", "SERVICE", "NODE", "STATE", "TARGET"], &rows).trim_end().to_string());
    }
    l
}

pub async fn run_get_volumes(namespace: Option<&str>, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let req = pb::ListVolumesRequest { namespace: namespace.unwrap_or("").to_string() };
    let views = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::control(ch).list_volumes(req).await.map(|r| r.into_inner().volumes) }
        })
        .await?;
    let names = node_names(&client).await;
    let out: Vec<VolumeOut> = views.iter().map(|v| VolumeOut::from_view(v, &names)).collect();
    let now = now_ms();
    output::emit(g.output, &out, |out| {
        if out.is_empty() {
            let ns = namespace.map(|n| format!(" in namespace {n}")).unwrap_or_default();
            eprintln!("no volumes{ns}: apply a `kind: Volume` document, or a service with a per-slot mount");
            return;
        }
        output::table(VOLUME_HEADERS, &volume_rows(out, now));
    });
    Ok(())
}

pub async fn run_describe_volume(namespace: &str, name: &str, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let req = pb::VolumeRef { namespace: namespace.to_string(), name: name.to_string() };
    let view = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::control(ch).get_volume(req).await.map(|r| r.into_inner().volume) }
        })
        .await?
        .unwrap_or_default();
    let names = node_names(&client).await;
    let out = VolumeOut::from_view(&view, &names);
    output::emit(g.output, &out, |v| {
        for l in describe_lines(v) {
            out_line(&l);
        }
    });
    Ok(())
}

pub async fn run_delete_volumes(namespace: &str, names: &[String], g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    delete_each("volume", namespace, names, |name| {
        let req = pb::VolumeRef { namespace: namespace.to_string(), name };
        let client = &client;
        async move {
            client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::control(ch).delete_volume(req).await.map(|_| ()) }
                })
                .await
        }
    })
    .await
}

/// Deletes each of `names` with `delete`: prints `WHAT NS/NAME deleted`, or the refusal (not
/// found, in use, changed meanwhile) and goes on to the next; any other error stops it. Fails,
/// naming them, when some were not deleted.
pub async fn delete_each<F, Fut>(what: &str, namespace: &str, names: &[String], mut delete: F) -> Result<()>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let mut failed = Vec::new();
    for name in names {
        match delete(name.clone()).await {
            Ok(()) => out_line(&format!("{what} {} deleted", key(namespace, name))),
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition | Code::Aborted) => {
                eprintln!("error: {}", status_text(&s));
                failed.push(name.clone());
            }
            Err(s) => return Err(anyhow!("deleting {what} {}: {}", key(namespace, name), status_text(&s))),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} {what}s were not deleted ({}): see the errors above",
            failed.len(),
            names.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// `berth secret ...` and `berth config ...`.
#[derive(Subcommand)]
pub enum FileCmd {
    /// Store a new one from a file (`-` reads standard input). Refused if it exists.
    Create {
        name: String,
        /// The file holding the value; `-` for standard input.
        #[arg(long, value_name = "FILE")]
        from_file: PathBuf,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
        /// KEY=VALUE labels.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Give it a new value: a new version, rolled out to every service that mounts it (as any
    /// update, health-gated). An unchanged value changes nothing.
    Update {
        name: String,
        #[arg(long, value_name = "FILE")]
        from_file: PathBuf,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// List them: name, version, size, the services that mount them (never a value).
    #[command(visible_alias = "list")]
    Ls {
        /// Only this namespace (default: every namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Delete them: refused while services mount them.
    #[command(visible_aliases = ["delete", "remove"])]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// What `secret|config ls` and `create` print (and `-o json|yaml`): never a value.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct FileOut {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub version: u64,
    pub size_bytes: u64,
    pub services: Vec<String>,
    pub rolled: Vec<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl FileOut {
    fn from_view(v: &pb::FileView) -> FileOut {
        FileOut {
            kind: kind_name(v.kind).to_string(),
            namespace: v.namespace.clone(),
            name: v.name.clone(),
            version: v.version,
            size_bytes: v.size_bytes,
            services: v.services.clone(),
            rolled: v.rolled.clone(),
            created_at_ms: v.created_at_ms,
            updated_at_ms: v.updated_at_ms,
        }
    }
}

fn kind_name(k: i32) -> &'static str {
    if k == FileKind::Config as i32 { "config" } else { "secret" }
}

fn read_value(path: &PathBuf) -> Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data).context("reading standard input")?;
        return Ok(data);
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub async fn run_file(kind: FileKind, cmd: FileCmd, g: &Global) -> Result<()> {
    let what = kind_name(kind as i32);
    let client = crate::config::client(g)?;
    match cmd {
        FileCmd::Create { name, from_file, namespace, labels } => {
            put(&client, g, kind, &namespace, &name, read_value(&from_file)?, true, labels.into_iter().collect()).await
        }
        FileCmd::Update { name, from_file, namespace } => {
            put(&client, g, kind, &namespace, &name, read_value(&from_file)?, false, HashMap::new()).await
        }
        FileCmd::Ls { namespace } => {
            let req = pb::ListFilesRequest { kind: kind as i32, namespace: namespace.clone().unwrap_or_default() };
            let files = client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::control(ch).list_files(req).await.map(|r| r.into_inner().files) }
                })
                .await?;
            let out: Vec<FileOut> = files.iter().map(FileOut::from_view).collect();
            let now = now_ms();
            output::emit(g.output, &out, |out| {
                if out.is_empty() {
                    eprintln!("no {what}s: create one with `berth {what} create NAME --from-file FILE`");
                    return;
                }
                let rows: Vec<Vec<String>> = out
                    .iter()
                    .map(|f| {
                        vec![
                            f.namespace.clone(),
                            f.name.clone(),
                            f.version.to_string(),
                            human_bytes(f.size_bytes),
                            if f.services.is_empty() { "-".into() } else { f.services.join(",") },
                            fmt_age(now - f.updated_at_ms),
                        ]
                    })
                    .collect();
                output::table(&["NAMESPACE", "NAME", "VERSION", "SIZE", "SERVICES", "UPDATED"], &rows);
            });
            Ok(())
        }
        FileCmd::Rm { names, namespace } => {
            delete_each(what, &namespace, &names, |name| {
                let req = pb::FileRef { kind: kind as i32, namespace: namespace.clone(), name };
                let client = &client;
                async move {
                    client
                        .call(Call::Idempotent, |ch| {
                            let req = req.clone();
                            async move { Client::control(ch).delete_file(req).await.map(|_| ()) }
                        })
                        .await
                }
            })
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn put(
    client: &crate::client::Client,
    g: &Global,
    kind: FileKind,
    namespace: &str,
    name: &str,
    data: Vec<u8>,
    create: bool,
    labels: HashMap<String, String>,
) -> Result<()> {
    let what = kind_name(kind as i32);
    let req = pb::PutFileRequest {
        kind: kind as i32,
        namespace: namespace.to_string(),
        name: name.to_string(),
        data,
        create,
        labels,
    };
    // Not repeated blindly: a retried create would find its own first attempt and fail.
    let r = client
        .call(Call::Once, |ch| {
            let req = req.clone();
            async move { Client::control(ch).put_file(req).await.map(|r| r.into_inner().file) }
        })
        .await;
    let view = match r {
        Ok(v) => v.unwrap_or_default(),
        Err(s) => return Err(anyhow!("{}", status_text(&s))),
    };
    let out = FileOut::from_view(&view);
    output::emit(g.output, &out, |f| {
        out_line(&format!("{what} {} stored (version {})", key(&f.namespace, &f.name), f.version));
        if !f.rolled.is_empty() {
            out_line(&format!("    rolling out to: {}", f.rolled.join(", ")));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_prints_its_driver_node_usage_and_tasks() {
        let spec = r#"{"driver":"local","access":"single-node-writer","size":"1Gi"}"#;
        let view = VolumeView {
            record: Some(pb::VolumeRecord {
                namespace: "shop".into(),
                name: "db-1".into(),
                spec_json: spec.into(),
                node_id: "n1".into(),
                used_bytes: 3 << 20,
                capacity_bytes: 1 << 30,
                usage_at_ms: 5,
                created_by_service: "db".into(),
                created_at_ms: 1,
                ..Default::default()
            }),
            mod_revision: 2,
            services: vec![],
            tasks: vec![pb::VolumeTask {
                task_id: "db.1.abc".into(),
                service: "db".into(),
                node_id: "n1".into(),
                state: pb::agent::TaskState::Running as i32,
                target: "/data".into(),
                read_only: false,
            }],
        };
        let names: HashMap<String, String> = [("n1".to_string(), "host-a".to_string())].into();
        let out = VolumeOut::from_view(&view, &names);
        let text = describe_lines(&out).join("\n");
        for w in
            ["shop/db-1", "local", "single-node-writer", "host-a", "1.0 GiB", "3.0 MiB of 1.0 GiB", "db.1.abc", "/data"]
        {
            assert!(text.contains(w), "{w:?} missing from\n{text}");
        }
        let rows = volume_rows(&[out], 1001);
        assert_eq!(rows[0][..5], ["shop", "db-1", "local", "single-node-writer", "host-a"]);
    }
}
