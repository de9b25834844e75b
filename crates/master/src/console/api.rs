//! The console's JSON API. Each handler makes the same call the CLI makes, in-process, as the
//! logged-in identity, and shapes the answer for the page.

use std::{convert::Infallible, future::Future, time::Duration};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use berth_api::pb::{
    self, cluster_server::Cluster as _, control_service_server::ControlService as _, kv_server::Kv as _,
    nodes_server::Nodes as _,
};
use berth_types::event::{self, ClusterEvent, EVENTS_PREFIX};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Console, Session, login_cookie, logout_cookie, token_session};
use crate::{
    cluster_service::ClusterService, control_service::ControlSvc, kv_service::KvService, nodes_service::NodesService,
};

/// How long a console call may take before the page is told the cluster did not answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The most events a page shows.
const MAX_EVENTS: usize = 500;

/// Makes a client API call as the session's identity.
async fn call<T, R, Fut>(s: &Session, msg: T, f: impl FnOnce(tonic::Request<T>) -> Fut) -> Result<R, ApiError>
where
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let mut req = tonic::Request::new(msg);
    req.extensions_mut().insert(s.caller.clone());
    match tokio::time::timeout(CALL_TIMEOUT, f(req)).await {
        Ok(r) => Ok(r?.into_inner()),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster did not answer within 15s: is a majority of masters up? (`berth cluster status`)",
        )),
    }
}

/// A request body, parsed with a message that says what is wrong.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], example: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not what this call takes ({e}); send {example}"),
        )
    })
}

/// `ROLLOUT_STATE_ROLLING_BACK` -> `rolling back`.
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase().replace('_', " ")
}

fn session_json(s: &Session) -> Value {
    json!({
        "identity": s.caller.identity.to_string(),
        "via": s.via,
        "expires_ms": s.expires_ms,
        "version": berth_api::version::VERSION,
    })
}

pub(super) async fn whoami(Extension(s): Extension<Session>) -> Json<Value> {
    Json(session_json(&s))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

pub(super) async fn login(State(c): State<Console>, raw: Bytes) -> Result<Response, ApiError> {
    let l: Login = body(&raw, r#"{"token": "BERTHC-1-..."}"#)?;
    let s = token_session(&c.ctx, &l.token)?;
    tracing::info!(identity = %s.caller.identity, "console login");
    let cookie = login_cookie(l.token.trim(), s.expires_ms.unwrap_or_default());
    Ok(([(header::SET_COOKIE, cookie)], Json(session_json(&s))).into_response())
}

pub(super) async fn logout() -> Response {
    ([(header::SET_COOKIE, logout_cookie())], Json(json!({"ok": true}))).into_response()
}

pub(super) async fn cluster(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
) -> Result<Json<Value>, ApiError> {
    let svc = ClusterService { ctx: c.ctx.clone() };
    let st = call(&s, pb::StatusRequest {}, |r| async move { svc.status(r).await }).await?;
    let members: Vec<Value> = st
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "endpoint": m.endpoint, "role": m.role, "voter": m.voter,
                "last_log_index": m.last_log_index, "applied_index": m.applied_index,
                "db_size_bytes": m.db_size_bytes, "version": m.version, "error": m.error,
            })
        })
        .collect();
    Ok(Json(json!({
        "leader": st.leader,
        "term": st.term,
        "members": members,
        "served_by": c.ctx.id,
        "revision": st.header.map_or(0, |h| h.revision),
    })))
}

pub(super) async fn nodes(State(c): State<Console>, Extension(s): Extension<Session>) -> Result<Json<Value>, ApiError> {
    let svc = NodesService { ctx: c.ctx.clone() };
    let list = call(&s, pb::NodeListRequest {}, |r| async move { svc.node_list(r).await }).await?;
    let nodes: Vec<Value> = list
        .nodes
        .into_iter()
        .filter_map(|info| {
            let n = info.node?;
            let res = n.resources.unwrap_or_default();
            Some(json!({
                "id": n.id, "name": n.name,
                "status": enum_name(n.status().as_str_name(), "NODE_STATUS_"),
                "availability": enum_name(n.availability().as_str_name(), "NODE_AVAILABILITY_"),
                "cpu_millis": res.cpu_millis, "memory_bytes": res.memory_bytes, "disk_bytes": res.disk_bytes,
                "version": n.agent_version, "address": n.advertise_addr, "labels": n.labels,
                "status_message": n.status_message, "edge": n.edge,
                "heartbeat_age_ms": info.last_heartbeat_age_ms, "connected": info.connected,
            }))
        })
        .collect();
    Ok(Json(json!({ "nodes": nodes })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Availability {
    availability: String,
}

pub(super) async fn node_availability(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path(node): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let a: Availability = body(&raw, r#"{"availability": "drain"}"#)?;
    let availability = match a.availability.as_str() {
        "active" => pb::NodeAvailability::Active,
        "pause" => pb::NodeAvailability::Pause,
        "drain" => pb::NodeAvailability::Drain,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("availability {other:?} is not one of active, pause, drain"),
            ));
        }
    };
    let req = pb::NodeUpdateRequest { node, availability: Some(availability as i32), ..Default::default() };
    let svc = NodesService { ctx: c.ctx.clone() };
    let r = call(&s, req, |r| async move { svc.node_update(r).await }).await?;
    Ok(Json(json!({ "node": r.node.map(|n| n.name), "availability": a.availability })))
}

fn rollout_json(r: Option<&pb::Rollout>) -> Value {
    match r {
        Some(r) => json!({
            "state": enum_name(r.state().as_str_name(), "ROLLOUT_STATE_"),
            "message": r.message, "failures": r.failures, "updated_at_ms": r.updated_at_ms,
        }),
        None => Value::Null,
    }
}

fn service_json(v: &pb::ServiceView) -> Value {
    let rec = v.record.clone().unwrap_or_default();
    let spec: Value = serde_json::from_str(&rec.spec_json).unwrap_or(Value::Null);
    json!({
        "namespace": rec.namespace, "name": rec.name, "version": rec.version,
        "desired": v.desired, "running": v.running, "pending": v.pending,
        "image": spec.pointer("/spec/task/image").cloned().unwrap_or(Value::Null),
        "command": spec.pointer("/spec/task/command").cloned().unwrap_or(Value::Null),
        "mode": spec.pointer("/spec/mode").cloned().unwrap_or(Value::Null),
        "rollout": rollout_json(rec.rollout.as_ref()), "deleting": rec.deleting, "vip": rec.vip,
        "updated_at_ms": rec.updated_at_ms, "has_previous": !rec.previous_spec_json.is_empty(),
        "spec": spec,
    })
}

pub(super) async fn services(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
) -> Result<Json<Value>, ApiError> {
    let svc = ControlSvc { ctx: c.ctx.clone() };
    let list = call(&s, pb::ListServicesRequest::default(), |r| async move { svc.list_services(r).await }).await?;
    Ok(Json(json!({ "services": list.services.iter().map(service_json).collect::<Vec<_>>() })))
}

/// The events kept from `since_ms` on that `keep` wants, the newest [`MAX_EVENTS`]; an error
/// message instead when the caller may not read them (they are cluster-admin's to read).
async fn read_events(
    c: &Console,
    s: &Session,
    since_ms: i64,
    keep: impl Fn(&ClusterEvent) -> bool,
) -> Result<Vec<ClusterEvent>, String> {
    let req = pb::RangeRequest {
        key: event::key_at(since_ms).into_bytes(),
        range_end: berth_types::prefix_end(EVENTS_PREFIX.as_bytes()),
        ..Default::default()
    };
    let svc = KvService { ctx: c.ctx.clone() };
    let resp = call(s, req, |r| async move { svc.range(r).await }).await.map_err(|e| e.1)?;
    let mut events: Vec<ClusterEvent> =
        resp.kvs.iter().filter_map(|kv| serde_json::from_slice::<ClusterEvent>(&kv.value).ok()).filter(keep).collect();
    let skip = events.len().saturating_sub(MAX_EVENTS);
    Ok(events.split_off(skip))
}

pub(super) async fn service(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let svc = ControlSvc { ctx: c.ctx.clone() };
    let sref = pb::ServiceRef { namespace: ns.clone(), name: name.clone() };
    let got = call(&s, sref, |r| async move { svc.get_service(r).await }).await?;
    // Tasks name their nodes by id; the page shows names. A caller who may not list nodes sees
    // the ids.
    let nodes = NodesService { ctx: c.ctx.clone() };
    let names: std::collections::HashMap<String, String> =
        match call(&s, pb::NodeListRequest {}, |r| async move { nodes.node_list(r).await }).await {
            Ok(list) => list.nodes.into_iter().filter_map(|i| i.node).map(|n| (n.id, n.name)).collect(),
            Err(_) => Default::default(),
        };
    let tasks: Vec<Value> = got
        .tasks
        .iter()
        .map(|t| {
            json!({
                "id": t.id, "slot": t.slot, "node_id": t.node_id, "node": names.get(&t.node_id),
                "spec_version": t.spec_version,
                "state": berth_api::task_state_name(t.state), "desired": berth_api::task_state_name(t.desired_state),
                "message": t.message, "exit_code": t.exit_code, "attempt": t.attempt,
                "health": enum_name(t.health().as_str_name(), "TASK_HEALTH_"),
                "pending_reason": t.pending_reason, "updated_at_ms": t.updated_at_ms,
            })
        })
        .collect();
    let since = crate::objects::now_ms() - 3600 * 1000;
    let (events, events_error) = match read_events(&c, &s, since, |e| e.concerns("service", &ns, &name)).await {
        Ok(e) => (Some(e), None),
        Err(e) => (None, Some(e)),
    };
    Ok(Json(json!({
        "service": got.service.as_ref().map(service_json),
        "tasks": tasks,
        "events": events,
        "events_error": events_error,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scale {
    replicas: u32,
}

pub(super) async fn scale(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path((ns, name)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: Scale = body(&raw, r#"{"replicas": 3}"#)?;
    let req = pb::ScaleRequest { service: Some(pb::ServiceRef { namespace: ns, name }), replicas: b.replicas };
    let svc = ControlSvc { ctx: c.ctx.clone() };
    let r = call(&s, req, |r| async move { svc.scale(r).await }).await?;
    Ok(Json(json!({ "service": r.service.as_ref().map(service_json) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollout {
    action: String,
}

pub(super) async fn rollout(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path((ns, name)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: Rollout = body(&raw, r#"{"action": "pause"}"#)?;
    let action = match b.action.as_str() {
        "pause" => pb::RolloutAction::Pause,
        "resume" => pb::RolloutAction::Resume,
        "undo" => pb::RolloutAction::Undo,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("rollout action {other:?} is not one of pause, resume, undo"),
            ));
        }
    };
    let req = pb::RolloutRequest { service: Some(pb::ServiceRef { namespace: ns, name }), action: action as i32 };
    let svc = ControlSvc { ctx: c.ctx.clone() };
    let r = call(&s, req, |r| async move { svc.rollout(r).await }).await?;
    Ok(Json(json!({ "service": r.service.as_ref().map(service_json) })))
}

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    since_ms: Option<i64>,
}

pub(super) async fn events(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let since = q.since_ms.unwrap_or(0);
    let events = read_events(&c, &s, since, |_| true).await.map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e))?;
    Ok(Json(json!({ "events": events })))
}

#[derive(Deserialize)]
pub(super) struct LogsQuery {
    tail: Option<u32>,
}

/// A task's log, live: Server-Sent Events, one `log` event per line (JSON), and an `error`
/// event (then the end) when the stream breaks, which the page shows and retries.
pub(super) async fn logs(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path(task): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let req = pb::LogsRequest { target: task, follow: true, tail: q.tail.unwrap_or(200), ..Default::default() };
    let svc = ControlSvc { ctx: c.ctx.clone() };
    let lines = call(&s, req, |r| async move { svc.logs(r).await }).await?;
    let events = lines
        .map(|item| {
            Ok::<_, Infallible>(match item {
                Ok(e) => Event::default()
                    .event("log")
                    .json_data(json!({
                        "task_id": e.task_id, "ts_ms": e.ts_ms, "stream": e.stream, "line": e.line,
                    }))
                    .unwrap_or_default(),
                Err(st) => Event::default().event("error").data(st.message().replace('\n', " ")),
            })
        })
        .chain(futures::stream::once(async { Ok(Event::default().event("end").data("the log stream ended")) }));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}
