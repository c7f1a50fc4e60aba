//! The control plane: REST API (keys, hosts, object-store points and maintenance, recoveries),
//! `/healthz`, `/metrics`. Everything but
//! `/healthz` needs `Authorization: Bearer <admin token>`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tern_core::HostId;
use tracing::info;

use crate::blockstore::{BlockStore, now_ms};
use crate::db::KeyRecord;
use crate::metrics::Metrics;
use crate::secrets::{MasterKey, new_access_key_id, new_secret, token_matches};

/// Shared state of the control plane.
#[derive(Debug, Clone)]
pub struct ControlState {
    /// Block store (and through it the DB).
    pub store: Arc<BlockStore>,
    /// Seals new secrets.
    pub master: Arc<MasterKey>,
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// SHA-256 of the admin token.
    pub admin_token_hash: [u8; 32],
    /// The object store, when configured.
    pub objects: Option<Arc<crate::objects::ObjectStores>>,
    /// Boot-in-Cloud, when configured (`[recovery]`).
    pub recoveries: Option<Arc<crate::recovery::Recoveries>>,
}

fn recoveries_of(st: &ControlState) -> Result<&Arc<crate::recovery::Recoveries>, Box<Response>> {
    st.recoveries.as_ref().ok_or_else(|| {
        Box::new(
            (
                StatusCode::NOT_FOUND,
                "Boot-in-Cloud is not configured ([recovery] in the config file)",
            )
                .into_response(),
        )
    })
}

fn recovery_failed(e: &crate::recovery::RecoveryError) -> Response {
    use crate::recovery::RecoveryError as E;
    match e {
        E::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()).into_response(),
        E::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()).into_response(),
        other => internal(tern_core::error_chain(other)),
    }
}

async fn create_recovery(
    State(st): State<ControlState>,
    body: Result<Json<crate::recovery::RecoveryRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let r = match recoveries_of(&st) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    // The body may hold a key: say what is wrong without echoing it.
    let Ok(Json(req)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            "expected {\"host\", \"point\", \"mode\": \"block|object\", \"drill\", \"flavor\", \"encryption_key\"}",
        )
            .into_response();
    };
    match r.start(req).await {
        Ok(rec) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "id": rec.id, "state": rec.state, "instance": rec.instance })),
        )
            .into_response(),
        Err(e) => recovery_failed(&e),
    }
}

async fn list_recoveries(State(st): State<ControlState>) -> Response {
    let r = match recoveries_of(&st) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match r.list() {
        Ok(l) => Json(l).into_response(),
        Err(e) => recovery_failed(&e),
    }
}

async fn get_recovery(State(st): State<ControlState>, Path(id): Path<String>) -> Response {
    let r = match recoveries_of(&st) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match r.get(&id) {
        Ok(Some(rec)) => Json(rec).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such recovery").into_response(),
        Err(e) => recovery_failed(&e),
    }
}

async fn delete_recovery(State(st): State<ControlState>, Path(id): Path<String>) -> Response {
    let r = match recoveries_of(&st) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match r.delete(&id) {
        Ok(_) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "id": id, "state": "deleting" })),
        )
            .into_response(),
        Err(e) => recovery_failed(&e),
    }
}

/// Options of the object-store maintenance requests.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct MaintenanceRequest {
    dry_run: bool,
    /// GC grace period override, seconds.
    grace_s: Option<u64>,
}

fn objects_of(st: &ControlState) -> Result<&Arc<crate::objects::ObjectStores>, Box<Response>> {
    st.objects.as_ref().ok_or_else(|| {
        Box::new(
            (
                StatusCode::NOT_FOUND,
                "no object store is configured ([object_store] in the config file)",
            )
                .into_response(),
        )
    })
}

fn objects_failed(e: &crate::objects::ObjectsError) -> Response {
    let msg = tern_core::error_chain(e);
    tracing::warn!(error = %msg, "object store request failed");
    (StatusCode::BAD_GATEWAY, msg).into_response()
}

async fn object_points(State(st): State<ControlState>) -> Response {
    if let Err(r) = objects_of(&st) {
        return *r;
    }
    match st.store.db().object_points() {
        Ok(points) => Json(
            points
                .into_iter()
                .map(|(host, point, rec)| serde_json::json!({ "host": host, "point": point, "record": rec }))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => internal(e),
    }
}

async fn object_scan(State(st): State<ControlState>) -> Response {
    let o = match objects_of(&st) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    match o.scan().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => objects_failed(&e),
    }
}

async fn object_prune(State(st): State<ControlState>, body: Option<Json<MaintenanceRequest>>) -> Response {
    let o = match objects_of(&st) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let req = body.map(|Json(b)| b).unwrap_or_default();
    match o.prune(req.dry_run).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => objects_failed(&e),
    }
}

async fn object_gc(State(st): State<ControlState>, body: Option<Json<MaintenanceRequest>>) -> Response {
    let o = match objects_of(&st) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let req = body.map(|Json(b)| b).unwrap_or_default();
    match o
        .gc(req.dry_run, req.grace_s.map(std::time::Duration::from_secs))
        .await
    {
        Ok(r) => Json(r).into_response(),
        Err(e) => objects_failed(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    hosts: Vec<HostId>,
}

/// A newly issued key (the only time its secret is shown).
#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedKey {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Hosts it may access.
    pub hosts: Vec<HostId>,
}

#[derive(Debug, Serialize)]
struct KeyView {
    access_key_id: String,
    hosts: Vec<HostId>,
    created_unix_ms: u64,
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "control request failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error (see the gateway log)",
    )
        .into_response()
}

async fn auth(State(st): State<ControlState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| token_matches(t.trim(), &st.admin_token_hash));
    if ok {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "admin token required",
        )
            .into_response()
    }
}

async fn metrics(State(st): State<ControlState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn create_key(State(st): State<ControlState>, Json(req): Json<NewKey>) -> Response {
    if req.hosts.is_empty() {
        return (StatusCode::BAD_REQUEST, "a key needs at least one host").into_response();
    }
    let id = new_access_key_id();
    let secret = new_secret();
    let rec = KeyRecord {
        hosts: req.hosts.clone(),
        sealed_secret: hex::encode(st.master.seal(&id, &secret)),
        created_unix_ms: now_ms(),
    };
    if let Err(e) = st.store.db().insert_key(&id, &rec) {
        return internal(e);
    }
    info!(key = %id, hosts = ?req.hosts, "access key issued");
    Json(IssuedKey {
        access_key_id: id,
        secret_access_key: secret,
        hosts: req.hosts,
    })
    .into_response()
}

async fn list_keys(State(st): State<ControlState>) -> Response {
    match st.store.db().keys() {
        Ok(keys) => Json(
            keys.into_iter()
                .map(|(id, r)| KeyView {
                    access_key_id: id,
                    hosts: r.hosts,
                    created_unix_ms: r.created_unix_ms,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => internal(e),
    }
}

async fn delete_key(State(st): State<ControlState>, Path(id): Path<String>) -> Response {
    match st.store.db().delete_key(&id) {
        Ok(true) => {
            info!(key = %id, "access key revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => (StatusCode::NOT_FOUND, "no such key").into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Debug, Serialize)]
struct HostView {
    host: HostId,
    disks: Vec<tern_core::protocol::DiskState>,
    open_sync: Option<String>,
    points: Vec<PointView>,
}

#[derive(Debug, Serialize)]
struct PointView {
    id: String,
    created_unix_ms: u64,
    snapshots: Vec<crate::db::SnapshotRef>,
}

async fn list_hosts(State(st): State<ControlState>) -> Response {
    let hosts = match st.store.db().hosts() {
        Ok(h) => h,
        Err(e) => return internal(e),
    };
    let mut out = Vec::new();
    for (id, rec) in hosts {
        let points = match st.store.db().points(&id) {
            Ok(p) => p,
            Err(e) => return internal(e),
        };
        out.push(HostView {
            host: id,
            disks: rec.disks,
            open_sync: rec.open_sync.map(|s| s.id.to_string()),
            points: points
                .into_iter()
                .map(|(pid, r)| PointView {
                    id: pid.to_string(),
                    created_unix_ms: r.created_unix_ms,
                    snapshots: r.snapshots,
                })
                .collect(),
        });
    }
    Json(out).into_response()
}

/// The control-plane router.
pub fn router(st: ControlState) -> Router {
    let authed = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/keys", get(list_keys).post(create_key))
        .route("/api/v1/keys/{id}", delete(delete_key))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/object/points", get(object_points))
        .route("/api/v1/object/scan", axum::routing::post(object_scan))
        .route("/api/v1/object/prune", axum::routing::post(object_prune))
        .route("/api/v1/object/gc", axum::routing::post(object_gc))
        .route("/api/v1/recoveries", get(list_recoveries).post(create_recovery))
        .route(
            "/api/v1/recoveries/{id}",
            get(get_recovery).delete(delete_recovery),
        )
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(authed)
        .with_state(st)
}
