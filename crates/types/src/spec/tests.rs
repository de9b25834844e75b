use std::time::Duration;

use super::*;

const WEB: &str = r#"kind: Service
metadata: {name: web, namespace: default}
spec:
  mode: replicated
  replicas: 3
  task:
    runtime: process
    command: ["/usr/bin/python3", "-m", "http.server", "8080"]
    resources: {cpu: 0.25, memory: 64Mi}
    health: {http: {port: 8080, path: /}, interval: 2s}
  placement:
    spread: [node.labels.zone]
    max_replicas_per_node: 1
  restart: {condition: any, delay: 1s}
"#;

fn one(text: &str) -> Service {
    let mut services = parse_documents(text).unwrap_or_else(|e| panic!("rejected: {e}\n{text}"));
    assert_eq!(services.len(), 1);
    services.remove(0)
}

/// Parses `text`, expects an error, and checks that its message names `field` and contains each of `words`.
fn rejected(text: &str, field: &str, words: &[&str]) -> SpecError {
    let err = match parse_documents(text) {
        Ok(s) => panic!("accepted: {s:?}\n{text}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(err.path().contains(field), "path {:?} does not name {field:?}: {msg}", err.path());
    assert!(msg.contains(field), "message does not name {field:?}: {msg}");
    for w in words {
        assert!(msg.contains(w), "message lacks {w:?}: {msg}");
    }
    err
}

/// A minimal valid process service with `extra` appended under `spec:` (two-space indented).
fn with_spec(extra: &str) -> String {
    format!(
        "kind: Service\nmetadata: {{name: api}}\nspec:\n  replicas: 2\n  task:\n    runtime: process\n    command: [/bin/api]\n{extra}"
    )
}

#[test]
fn example_document_parses_with_right_values() {
    let s = one(WEB);
    assert_eq!(s.kind, Kind::Service);
    assert_eq!(s.key(), "default/web");
    assert_eq!(s.spec.mode, ServiceMode::Replicated);
    assert_eq!(s.spec.replicas, Some(3));
    let task = &s.spec.task;
    assert_eq!(task.runtime, Runtime::Process);
    assert_eq!(task.command, ["/usr/bin/python3", "-m", "http.server", "8080"]);
    assert_eq!(task.resources.cpu, Cpu(250));
    assert_eq!(task.resources.cpu.millis(), 250);
    assert_eq!(task.resources.memory.bytes(), 67_108_864);
    let health = task.health.as_ref().unwrap();
    assert_eq!(health.interval, Duration::from_secs(2));
    assert_eq!(health.timeout, Duration::from_secs(2));
    assert_eq!(health.retries, 3);
    assert_eq!(health.start_period, Duration::ZERO);
    assert_eq!(health.probe(), Some(Probe::Http(&HttpProbe { port: 8080, path: "/".into() })));
    let placement = &s.spec.placement;
    assert_eq!(placement.spread_labels().collect::<Vec<_>>(), ["zone"]);
    assert_eq!(placement.spread[0].label(), "zone");
    assert_eq!(placement.max_replicas_per_node, Some(1));
    assert_eq!(s.spec.restart, RestartPolicy::default());
    assert_eq!(s.spec.restart.delay, Duration::from_secs(1));
    assert_eq!(s.spec.update.failure_action, FailureAction::Rollback);
    assert_eq!(s.spec.rollback.failure_action, FailureAction::Pause);
    assert_eq!(s.spec.update.monitor, Duration::from_secs(5));
    assert_eq!(s.spec.disconnect, DisconnectPolicy::Replace);
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn multi_document_file() {
    let text = format!(
        "{WEB}---\nkind: Service\nmetadata: {{name: worker, namespace: jobs, labels: {{team: data}}}}\nspec:\n  mode: global\n  task: {{runtime: docker, image: \"busybox:1\", command: [sleep, \"3600\"]}}\n  disconnect: at-most-once\n---\n"
    );
    let services = parse_documents(&text).unwrap();
    assert_eq!(services.len(), 2);
    assert_eq!(services[0].key(), "default/web");
    assert_eq!(services[1].key(), "jobs/worker");
    assert_eq!(services[1].spec.mode, ServiceMode::Global);
    assert_eq!(services[1].spec.replicas, None);
    assert_eq!(services[1].spec.disconnect, DisconnectPolicy::AtMostOnce);
    assert_eq!(services[1].metadata.labels["team"], "data");
}

#[test]
fn errors_in_later_documents_name_document_and_file_line() {
    let text = format!(
        "{WEB}---\nkind: Service\nmetadata: {{name: b}}\nspec:\n  replicas: 1\n  task: {{runtime: process, command: [x], colour: red}}\n"
    );
    let err = rejected(&text, "spec.task.colour", &["document 2", "unknown field"]);
    assert_eq!(err.document(), Some(2));
    assert_eq!(err.line(), Some(20), "{err}");

    let dup = format!("{WEB}---\n{WEB}");
    let err = parse_documents(&dup).unwrap_err();
    assert!(matches!(err, SpecError::Duplicate { document: 2, first: 1, .. }), "{err}");
    assert!(err.to_string().contains("default/web"));
}

#[test]
fn empty_input_is_an_error() {
    assert_eq!(parse_documents(""), Err(SpecError::Empty));
    assert_eq!(parse_documents("---\n"), Err(SpecError::Empty));
}

#[test]
fn unknown_field_is_rejected_with_its_line() {
    let err = rejected(&with_spec("    colour: red\n"), "spec.task.colour", &["unknown field `colour`", "line 8"]);
    assert_eq!(err.line(), Some(8));
    assert!(matches!(err, SpecError::Parse { column: Some(_), .. }));
    rejected(&with_spec("  replcias: 3\n"), "spec.replcias", &["unknown field", "expected one of", "`replicas`"]);
    rejected(&with_spec("    resources: {cpu: 1, limits: {gpu: 1}}\n"), "spec.task.resources.limits.gpu", &[]);
    let top =
        "kind: Service\nmetadata: {name: a}\nspec: {replicas: 1, task: {runtime: process, command: [x]}}\nextra: 1\n";
    rejected(top, "extra", &["line 4"]);
}

#[test]
fn bad_kind_lists_allowed_kinds() {
    let text = WEB.replace("kind: Service", "kind: Deployment");
    rejected(&text, "kind", &["`Deployment`", "`Service`"]);
}

#[test]
fn bad_runtime_is_rejected() {
    let text = with_spec("").replace("runtime: process", "runtime: podman");
    rejected(&text, "spec.task.runtime", &["`podman`", "`process`", "`docker`", "line 6"]);
}

#[test]
fn docker_needs_image_and_process_forbids_it() {
    let text = with_spec("").replace("runtime: process", "runtime: docker");
    rejected(&text, "spec.task.image", &["requires `image`"]);
    rejected(&with_spec("    image: nginx\n"), "spec.task.image", &["not allowed"]);
    let text = with_spec("").replace("command: [/bin/api]", "args: [x]");
    rejected(&text, "spec.task.command", &["requires `command`"]);
    let ok = with_spec("    image: nginx:1.27\n").replace("runtime: process", "runtime: docker");
    assert_eq!(one(&ok).spec.task.image.as_deref(), Some("nginx:1.27"));
}

#[test]
fn replicas_rules() {
    let global = with_spec("  mode: global\n");
    rejected(&global, "spec.replicas", &["not allowed with mode `global`"]);
    let no_replicas = with_spec("").replace("  replicas: 2\n", "");
    rejected(&no_replicas, "spec.replicas", &["requires `replicas`"]);
    let err = rejected(&with_spec("").replace("replicas: 2", "replicas: -1"), "spec.replicas", &["0 to 10000"]);
    assert_eq!(err.line(), Some(4));
    rejected(&with_spec("").replace("replicas: 2", "replicas: 10001"), "spec.replicas", &["10001", "0 to 10000"]);
    rejected(&with_spec("").replace("replicas: 2", "replicas: 99999999999"), "spec.replicas", &["0 to 10000"]);
    assert_eq!(one(&with_spec("").replace("replicas: 2", "replicas: 10000")).spec.replicas, Some(10_000));
    assert_eq!(one(&with_spec("").replace("replicas: 2", "replicas: 0")).spec.replicas, Some(0));
}

#[test]
fn resources_rules() {
    rejected(&with_spec("    resources: {memory: 64MB}\n"), "spec.task.resources.memory", &["`MB`", "Mi", "line 8"]);
    rejected(&with_spec("    resources: {cpu: -1}\n"), "spec.task.resources.cpu", &["negative"]);
    rejected(&with_spec("    resources: {cpu: 2cores}\n"), "spec.task.resources.cpu", &["250m"]);
    rejected(
        &with_spec("    resources: {cpu: 1, memory: 1Gi, limits: {memory: 512Mi}}\n"),
        "spec.task.resources.limits.memory",
        &["below the request"],
    );
    rejected(
        &with_spec("    resources: {cpu: 500m, limits: {cpu: 0.1}}\n"),
        "spec.task.resources.limits.cpu",
        &["below the request"],
    );
    let s = one(&with_spec("    resources: {cpu: \"250m\", memory: 1G, limits: {cpu: 2, memory: 2Gi}}\n"));
    let r = &s.spec.task.resources;
    assert_eq!((r.cpu, r.memory), (Cpu(250), Memory(1_000_000_000)));
    assert_eq!(r.limits, Some(ResourceLimits { cpu: Some(Cpu(2000)), memory: Some(Memory(2 << 30)), pids: None }));
}

#[test]
fn placement_rules() {
    let s = one(&with_spec(
        "  placement:\n    constraints: [\"node.labels.zone == eu-1a\", \"node.name != h3\"]\n    anti_affinity: [db]\n",
    ));
    let c = s.spec.placement.constraints();
    assert_eq!(
        c[0],
        Constraint { field: ConstraintField::Label("zone".into()), op: ConstraintOp::Eq, value: "eu-1a".into() }
    );
    assert_eq!((c[1].field.clone(), c[1].op), (ConstraintField::NodeName, ConstraintOp::Ne));

    let bad_op = with_spec("  placement:\n    constraints: [\"node.labels.zone = eu-1a\"]\n");
    rejected(&bad_op, "spec.placement.constraints[0]", &["`==` and `!=`", "line 9"]);
    let bad_field = with_spec("  placement:\n    constraints: [\"node.ip == 1\"]\n");
    rejected(&bad_field, "spec.placement.constraints[0]", &["node.labels.KEY"]);
    let spread = with_spec("  placement:\n    spread: [node.labels.zone, node.name]\n");
    rejected(&spread, "spec.placement.spread[1]", &["not a node label", "node.labels.KEY"]);
    let zero = with_spec("  placement: {max_replicas_per_node: 0}\n");
    rejected(&zero, "spec.placement.max_replicas_per_node", &["at least 1"]);
    let conflict = with_spec("  placement:\n    constraints: [\"node.name == a\", \"node.name == b\"]\n");
    rejected(&conflict, "spec.placement.constraints", &["node.name == a", "node.name == b", "no node"]);
    let contradiction = with_spec("  placement:\n    constraints: [\"node.id == a\", \"node.id != a\"]\n");
    rejected(&contradiction, "spec.placement.constraints", &["contradict"]);
    let both = with_spec("  placement: {affinity: [db], anti_affinity: [db]}\n");
    rejected(&both, "spec.placement.affinity", &["both"]);
    let bad_name = with_spec("  placement: {anti_affinity: [Db]}\n");
    rejected(&bad_name, "spec.placement.anti_affinity[0]", &["lowercase"]);
}

#[test]
fn health_rules() {
    let two = with_spec("    health: {http: {port: 80}, tcp: {port: 80}}\n");
    rejected(&two, "spec.task.health", &["exactly one of `http`, `tcp` or `exec`"]);
    let none = with_spec("    health: {interval: 1s}\n");
    rejected(&none, "spec.task.health", &["exactly one"]);
    let bad_duration = with_spec("    health: {tcp: {port: 80}, interval: 2 seconds}\n");
    rejected(&bad_duration, "spec.task.health.interval", &["\"500ms\"", "line 8"]);
    let unitless = with_spec("    health: {tcp: {port: 80}, timeout: 3}\n");
    rejected(&unitless, "spec.task.health.timeout", &["no unit"]);
    let s = one(&with_spec(
        "    health: {exec: {command: [/bin/check]}, interval: 500ms, timeout: 1m, retries: 5, start_period: 1m30s}\n",
    ));
    let h = s.spec.task.health.unwrap();
    assert_eq!(h.probe(), Some(Probe::Exec(&ExecProbe { command: vec!["/bin/check".into()] })));
    assert_eq!(
        (h.interval, h.timeout, h.retries, h.start_period),
        (Duration::from_millis(500), Duration::from_secs(60), 5, Duration::from_secs(90))
    );
}

#[test]
fn metadata_rules() {
    let text = with_spec("").replace("name: api", "name: Api_1");
    rejected(&text, "metadata.name", &["lowercase", "line 2"]);
    let text = with_spec("").replace("name: api", "name: 1api");
    rejected(&text, "metadata.name", &["starting with a letter"]);
    let long = "a".repeat(64);
    rejected(&with_spec("").replace("name: api", &format!("name: {long}")), "metadata.name", &["1-63"]);
}

#[test]
fn update_restart_and_enums() {
    let s = one(&with_spec(
        "  restart: {condition: on-failure, max_attempts: 3, window: 1m}\n  update: {parallelism: 2, order: start-first, max_failure_ratio: 0.2}\n  rollback: {failure_action: continue}\n",
    ));
    assert_eq!(s.spec.restart.condition, RestartCondition::OnFailure);
    assert_eq!(s.spec.restart.max_attempts, Some(3));
    assert_eq!(s.spec.restart.window, Duration::from_secs(60));
    assert_eq!(s.spec.update.parallelism, 2);
    assert_eq!(s.spec.update.order, UpdateOrder::StartFirst);
    assert_eq!(s.spec.update.failure_action, FailureAction::Rollback);
    assert_eq!(s.spec.rollback.failure_action, FailureAction::Continue);
    assert_eq!(s.spec.rollback.monitor, Duration::from_secs(5));
    rejected(&with_spec("  update: {max_failure_ratio: 1.5}\n"), "spec.update.max_failure_ratio", &["0.0 to 1.0"]);
    rejected(&with_spec("  rollback: {parallelism: 0}\n"), "spec.rollback.parallelism", &["at least 1"]);
    rejected(&with_spec("  update: {order: random}\n"), "spec.update.order", &["`stop-first`", "`start-first`"]);
    rejected(&with_spec("  restart: {condition: always}\n"), "spec.restart.condition", &["`on-failure`"]);
    rejected(&with_spec("  disconnect: maybe\n"), "spec.disconnect", &["`replace`", "`at-most-once`"]);
}

#[test]
fn json_input_works() {
    let json = r#"{"kind": "Service", "metadata": {"name": "web"},
        "spec": {"replicas": 3, "task": {"runtime": "process", "command": ["/bin/web"],
                 "resources": {"cpu": "250m", "memory": 67108864}, "health": {"tcp": {"port": 80}, "interval": "2s"}}}}"#;
    let s = one(json);
    assert_eq!(s.key(), "default/web");
    assert_eq!(s.spec.task.resources.cpu, Cpu(250));
    assert_eq!(s.spec.task.resources.memory, Memory(67_108_864));
    let bad = json.replace("\"runtime\": \"process\"", "\"runtime\": \"process\", \"colour\": 1");
    rejected(&bad, "spec.task.colour", &["line 2"]);
}

#[test]
fn serialization_round_trips() {
    let text = format!(
        "{}  placement:\n    constraints: [\"node.labels.zone == eu-1a\"]\n    spread: [node.labels.zone]\n  update: {{delay: 1500ms}}\n",
        with_spec(
            "    ports: [{container: 8080, published: 30080}, {container: 53, protocol: udp}]\n    resources: {cpu: 1.5, memory: 1Gi, limits: {memory: 2Gi}}\n    health: {http: {port: 8080}}\n    env: {B: \"2\", A: \"1\"}\n    workdir: /srv\n"
        )
    );
    let s = one(&text);
    let json = serde_json::to_string(&s).unwrap();
    let back: Service = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let again = parse_documents(&json).unwrap();
    assert_eq!(again, std::slice::from_ref(&s));
    let yaml = serde_yaml_ng::to_string(&s).unwrap();
    assert_eq!(parse_documents(&yaml).unwrap(), std::slice::from_ref(&s));
    assert_eq!(back.canonical_json(), s.canonical_json());
    assert!(json.contains("\"cpu\":\"1500m\""), "{json}");
    assert!(json.contains("\"delay\":\"1500ms\""), "{json}");
}

#[test]
fn canonical_json_ignores_explicit_defaults() {
    let explicit = r#"kind: Service
metadata: {name: web, namespace: default, labels: {}}
spec:
  mode: replicated
  replicas: 3
  task:
    runtime: process
    command: ["/usr/bin/python3", "-m", "http.server", "8080"]
    args: []
    env: {}
    resources: {cpu: 250m, memory: 67108864}
    ports: []
    health: {http: {port: 8080, path: /}, interval: 2000ms, timeout: 2s, retries: 3, start_period: 0s}
  placement:
    constraints: []
    spread: [node.labels.zone]
    max_replicas_per_node: 1
    affinity: []
    anti_affinity: []
  restart: {condition: any, delay: 1s, window: 0s}
  update: {parallelism: 1, delay: 0s, order: stop-first, failure_action: rollback, monitor: 5s, max_failure_ratio: 0.0}
  rollback: {parallelism: 1, delay: 0s, order: stop-first, failure_action: pause, monitor: 5s, max_failure_ratio: 0.0}
  disconnect: replace
"#;
    let minimal = r#"kind: Service
metadata: {name: web}
spec:
  replicas: 3
  task:
    runtime: process
    command: ["/usr/bin/python3", "-m", "http.server", "8080"]
    resources: {cpu: 0.25, memory: 64Mi}
    health: {http: {port: 8080}, interval: 2s}
  placement: {spread: [node.labels.zone], max_replicas_per_node: 1}
"#;
    let (a, b, web) = (one(explicit), one(minimal), one(WEB));
    assert_eq!(a, b);
    assert_eq!(a.canonical_json(), b.canonical_json());
    assert_eq!(a.canonical_json(), web.canonical_json());
    let changed = one(&minimal.replace("replicas: 3", "replicas: 4"));
    assert_ne!(changed.canonical_json(), b.canonical_json());
    let rollback_changed = one(&format!("{minimal}  rollback: {{failure_action: rollback}}\n"));
    assert_ne!(rollback_changed.canonical_json(), b.canonical_json());
}

#[test]
fn validate_catches_programmatic_mistakes() {
    let mut s = one(WEB);
    s.spec.replicas = Some(MAX_REPLICAS + 1);
    assert_eq!(s.validate().unwrap_err().path(), "spec.replicas");
    let mut s = one(WEB);
    s.metadata.name = "Bad".into();
    let err = s.validate().unwrap_err();
    assert_eq!(err.path(), "metadata.name");
    assert_eq!(err.document(), None);
}

#[test]
fn shipped_examples_are_valid() {
    for (name, text) in [
        ("web.yaml", include_str!("../../../../examples/web.yaml")),
        ("global.yaml", include_str!("../../../../examples/global.yaml")),
        ("stateful.yaml", include_str!("../../../../examples/stateful.yaml")),
        ("docker-web.yaml", include_str!("../../../../examples/docker-web.yaml")),
        ("compose-web.yaml", include_str!("../../../../examples/compose-web.yaml")),
    ] {
        let parsed = parse_documents(text);
        assert!(parsed.is_ok(), "examples/{name}: {}", parsed.unwrap_err());
    }
}

#[test]
fn validation_errors_name_the_line_of_the_field_or_its_parent() {
    let text = "kind: Service\nmetadata: {name: a}\nspec:\n  mode: replicated\n  replicas: 1\n  task: {runtime: process, command: [/bin/true]}\n---\n# second\nkind: Service\nmetadata: {name: b}\nspec:\n  mode: replicated\n  replicas: 1\n  task:\n    runtime: process\n";
    let e = parse_documents(text).unwrap_err();
    assert_eq!(e.document(), Some(2));
    assert_eq!(e.path(), "spec.task.command");
    assert_eq!(e.line(), Some(14), "{e}");
    assert!(e.to_string().contains("(line 14)"), "{e}");
}

#[test]
fn stop_signal_and_grace_have_defaults_and_are_checked() {
    let s = one(&with_spec(""));
    assert_eq!(s.spec.task.stop_signal, None);
    assert_eq!(s.spec.task.stop_signal_number(), 15);
    assert_eq!(s.spec.task.stop_grace_period, DEFAULT_STOP_GRACE);

    let s = one(&with_spec("    stop_signal: SIGINT\n    stop_grace_period: 30s\n"));
    assert_eq!(s.spec.task.stop_signal_number(), 2);
    assert_eq!(s.spec.task.stop_grace_period, Duration::from_secs(30));
    for (name, number) in [("QUIT", 3), ("sigusr1", 10), ("9", 9), (" SIGTERM ", 15)] {
        assert_eq!(signal_number(name), Some(number), "{name}");
    }

    rejected(&with_spec("    stop_signal: SIGBOGUS\n"), "spec.task.stop_signal", &["SIGBOGUS", "SIGTERM"]);
    rejected(&with_spec("    stop_signal: \"99\"\n"), "spec.task.stop_signal", &["1 to 31"]);
    rejected(&with_spec("    stop_grace_period: 2h\n"), "spec.task.stop_grace_period", &["too long", "1h"]);
}

#[test]
fn default_stop_settings_leave_the_serialized_task_unchanged() {
    // Specs stored before these fields existed must keep their template hash: the defaults are
    // not serialized.
    let s = one(&with_spec(""));
    let json = serde_json::to_string(&s.spec.task).unwrap();
    assert!(!json.contains("stop_signal") && !json.contains("stop_grace_period"), "{json}");
    let s = one(&with_spec("    stop_grace_period: 3s\n"));
    let json = serde_json::to_string(&s.spec.task).unwrap();
    assert!(json.contains("stop_grace_period"), "{json}");
    let back: TaskSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back.stop_grace_period, Duration::from_secs(3));
}

const NET: &str =
    "kind: Network\nmetadata: {name: backend, namespace: shop}\nspec: {subnet: 10.20.0.0/16, internal: true}\n";

#[test]
fn network_documents_parse_beside_services() {
    let docs = parse_all(&format!("{NET}---\n{WEB}")).unwrap();
    assert_eq!(docs.len(), 2);
    let Document::Network(n) = &docs[0] else { panic!("{docs:?}") };
    assert_eq!(n.key(), "shop/backend");
    assert_eq!(n.spec.subnet.unwrap().to_string(), "10.20.0.0/16");
    assert!(n.spec.internal);
    assert_eq!(docs[1].kind(), Kind::Service);
    // A network without a spec gets its subnet from the pool.
    let docs = parse_all("kind: Network\nmetadata: {name: plain}\n").unwrap();
    let Document::Network(n) = &docs[0] else { panic!() };
    assert_eq!((n.spec.subnet, n.spec.internal), (None, false));
    assert_eq!(n.metadata.namespace, "default");
    // A service and a network may share a name; two networks may not.
    assert!(parse_all(&format!("{NET}---\n{}", NET.replace("backend", "web"))).is_ok());
    let e = parse_all(&format!("{NET}---\n{NET}")).unwrap_err();
    assert!(e.to_string().contains("already defined by document 1"), "{e}");
    // Services only where only services are allowed.
    assert!(parse_documents(NET).unwrap_err().to_string().contains("only `kind: Service`"));
}

#[test]
fn bad_network_documents_say_what_is_wrong() {
    for (text, words) in [
        (
            "kind: Network\nmetadata: {name: n}\nspec: {subnet: 10.20.1.0/16}\n",
            &["spec.subnet", "did you mean 10.20.0.0/16", "line 3"][..],
        ),
        ("kind: Network\nmetadata: {name: n}\nspec: {subnet: 10.0.0.0/30}\n", &["spec.subnet", "/8 to /28"]),
        ("kind: Network\nmetadata: {name: n}\nspec: {subnet: nope}\n", &["spec.subnet", "CIDR"]),
        ("kind: Network\nmetadata: {name: n}\nspec: {mtu: 1400}\n", &["spec.mtu", "unknown field"]),
        ("kind: Network\nmetadata: {name: n}\nspec: {block_prefix: 30}\n", &["spec.block_prefix", "16 to 28"]),
        (
            "kind: Network\nmetadata: {name: n}\nspec: {subnet: 10.20.0.0/20, block_prefix: 18}\n",
            &["spec.block_prefix", "larger than the subnet 10.20.0.0/20"],
        ),
        ("kind: Network\nmetadata: {name: Bad_Name}\n", &["metadata.name", "lowercase"]),
        ("kind: Volumes\nmetadata: {name: n}\n", &["kind", "Service", "Network", "Volume"]),
        ("kind: Volume\nmetadata: {name: n}\n", &["missing field `spec`"]),
    ] {
        let e = parse_all(text).unwrap_err().to_string();
        for w in words {
            assert!(e.contains(w), "{e:?} lacks {w:?} for\n{text}");
        }
    }
}

#[test]
fn networks_endpoint_mode_and_port_names_are_checked() {
    let s = one(&with_spec(
        "    networks: [front, back]\n    ports: [{name: http, container: 80}]\n  endpoint_mode: dnsrr\n",
    ));
    assert_eq!(s.spec.task.networks, ["front", "back"]);
    assert_eq!(s.spec.task.ports[0].name.as_deref(), Some("http"));
    assert_eq!(s.spec.endpoint_mode, EndpointMode::Dnsrr);
    rejected(&with_spec("    networks: [front, front]\n"), "spec.task.networks[1]", &["twice"]);
    rejected(&with_spec("    networks: [Front]\n"), "spec.task.networks[0]", &["invalid network name"]);
    rejected(&with_spec("    networks: [a, b, c, d, e, f, g, h, i]\n"), "spec.task.networks", &["at most 8"]);
    rejected(&with_spec("    ports: [{name: -x, container: 80}]\n"), "spec.task.ports[0].name", &["IANA"]);
    rejected(
        &with_spec("    ports: [{name: web, container: 80}, {name: web, container: 81}]\n"),
        "spec.task.ports[1].name",
        &["twice"],
    );
    rejected(&with_spec("  endpoint_mode: round-robin\n"), "spec.endpoint_mode", &["unknown variant", "dnsrr"]);
    // The new fields stay out of the canonical JSON at their defaults, so the specs stored before
    // them keep their template hash.
    let plain = one(&with_spec(""));
    let json = plain.canonical_json();
    assert!(!json.contains("networks") && !json.contains("endpoint_mode") && !json.contains("\"name\":null"), "{json}");
}

/// A document whose aliases expand exponentially (a "billion laughs") is refused quickly,
/// without being expanded; one with an ordinary alias is fine.
#[test]
fn alias_bombs_are_refused_before_they_expand() {
    let mut bomb = String::from("kind: Service\nmetadata: {name: bomb}\nx0: &a0 [1, 2]\n");
    for i in 1..40 {
        bomb.push_str(&format!("x{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
    }
    let started = std::time::Instant::now();
    parse_all(&bomb).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // Under serde_yaml_ng's own repetition limit (100 alias uses per event), a document can still
    // expand far: the node budget stops it.
    let mut wide = String::from("kind: Service\nmetadata: {name: wide}\nspec:\n  task:\n    env: &e [");
    wide.push_str(&vec!["x"; 2000].join(", "));
    wide.push_str("]\n    x: [");
    wide.push_str(&vec!["*e"; 200].join(", "));
    wide.push_str("]\n");
    let err = parse_all(&wide).unwrap_err().to_string();
    assert!(err.contains("more than 100000 YAML nodes"), "{err}");
    let ok = "kind: Service\nmetadata: {name: web}\nspec:\n  replicas: 1\n  task: &t {runtime: process, command: [/bin/true]}\n";
    parse_all(ok).unwrap();
}

/// A syntax error after a document ends the parse with that error (serde_yaml_ng's document
/// iterator repeats it forever: the parser used to loop, growing until the OOM killer came).
#[test]
fn a_syntax_error_ends_the_parse() {
    let started = std::time::Instant::now();
    let err = parse_all("kind: Service\nkind: Service\n  replicas: 1\n").unwrap_err().to_string();
    assert!(err.contains("mapping values are not allowed") || err.contains("duplicate"), "{err}");
    let two = "kind: Service\nmetadata: {name: a}\nspec: {replicas: 1, task: {runtime: process, command: [/bin/true]}}\n---\nkind: Service\n  x: 1\n";
    let err = parse_all(two).unwrap_err().to_string();
    assert!(err.contains("document 2"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
