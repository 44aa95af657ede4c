//! The HTTP API: `/healthz`, `/readyz`, `/metrics` (Prometheus text) and a versioned, read-only
//! JSON API under `/api/v1` ([`ROUTES`]; `ulog-agent/openapi.json` describes it and a test
//! checks the server against it).
//!
//! # Never stalling the log server
//! The handlers run on the agent's tokio runtime, never on the receive thread. They read the
//! log registry through [`Telemetry::logs`] (a mutex held to clone an `Arc`), and a log's state by
//! locking its mutex only to copy (a few counters, or one chunk of the bitmaps, or the flight
//! recorder's ring). Work that walks bitmaps or encodes the exposition runs on the blocking pool.
//! Clients are bounded: at most [`MAX_CONNECTIONS`] connections (more are closed at once),
//! request headers within [`HEADER_READ_TIMEOUT`], connections recycled after
//! [`MAX_CONNECTION_AGE`] (gracefully), query parameters validated (unknown ones are errors),
//! pages capped. Every error is a JSON [`model::ErrorBody`] with a 4xx/5xx status.
//!
//! # Binding
//! 127.0.0.1 by default (`--http-addr`). A failure to bind (port in use, address not
//! configured) is logged and retried every 5 s; the log server keeps serving meanwhile: a
//! mirror's dirty log never waits for its telemetry.

pub mod model;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::metrics::export::Exporter;
use crate::metrics::flight::{newest_first, FLIGHT_SLOTS};
use crate::metrics::regions::{self, RegionState};
use crate::metrics::{clock, primary, Lifecycle, LogHandle, Telemetry};
use model::{parse_luid, ErrorBody, ErrorDetail, Health, RegionJson, RegionPage, RequestLog, RequestRecord};

/// The default listen address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9477";
/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections are closed (after the request in progress) once this old.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// `/healthz` fails when the receive loop has not run for this long.
pub const STALL_LIMIT_NS: u64 = crate::metrics::RECEIVE_LOOP_STALL_NS;
/// Default and largest page of `/regions`.
pub const REGIONS_DEFAULT_LIMIT: usize = 100;
/// Largest page of `/regions`.
pub const REGIONS_MAX_LIMIT: usize = 10_000;
/// Regions examined per `/regions` call at most (a rare state filter continues with `next`).
pub const REGIONS_SCAN_BUDGET: u64 = 1 << 24;

/// Every route: (path, method). The OpenAPI test checks that the document has exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("/", "get"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/metrics", "get"),
    ("/api/v1/agent", "get"),
    ("/api/v1/logs", "get"),
    ("/api/v1/logs/{log}", "get"),
    ("/api/v1/logs/{log}/regions", "get"),
    ("/api/v1/logs/{log}/requests", "get"),
    ("/api/v1/kernel/slow", "get"),
    ("/api/v1/cluster/confirm-fenced", "post"),
];

#[derive(Clone)]
struct App {
    tel: Arc<Telemetry>,
    exporter: Arc<Exporter>,
}

/// An API error: a status and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail { status: self.status.as_u16(), code: self.code.into(), message: self.message },
        };
        no_store((self.status, Json(body)).into_response())
    }
}

fn json<T: serde::Serialize>(v: T) -> Response {
    no_store(Json(v).into_response())
}

/// Query parameters, with JSON errors (and unknown parameters refused by the types).
struct Q<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Q(v))
            // The parameter names were checked (`check_query`); what is left is a value of the
            // wrong form, said without the parser's internals.
            .map_err(|_| {
                ApiError::bad_request(
                    "a query parameter has a value of the wrong form (limit, start: whole numbers; all: true or false)",
                )
            })
    }
}

/// The `{log}` path segment, with JSON errors.
struct LogKey(String);

impl<S: Send + Sync> FromRequestParts<S> for LogKey {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| LogKey(v))
            .map_err(|e| ApiError::bad_request(format!("bad path: {}", e.body_text())))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    luid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionsQuery {
    luid: Option<String>,
    state: Option<String>,
    start: Option<u64>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestsQuery {
    luid: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlowQuery {
    limit: Option<usize>,
    all: Option<bool>,
}

/// The router of the whole API.
pub fn router(tel: Arc<Telemetry>) -> Router {
    let app = App { exporter: Arc::new(Exporter::new(Arc::clone(&tel))), tel };
    Router::new()
        .route("/", get(landing))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/agent", get(agent))
        .route("/api/v1/logs", get(logs))
        .route("/api/v1/logs/{log}", get(log))
        .route("/api/v1/logs/{log}/regions", get(log_regions))
        .route("/api/v1/logs/{log}/requests", get(log_requests))
        .route("/api/v1/kernel/slow", get(kernel_slow))
        .route("/api/v1/cluster/confirm-fenced", post(confirm_fenced))
        // Only on matched routes (it needs the route's pattern); the fallbacks answer the rest.
        .route_layer(axum::middleware::from_fn(check_query))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// The query parameters each route takes; any other is refused with 400, so a typo
/// (`?lmit=10`) is an error rather than a silently ignored filter.
fn allowed_params(route: &str) -> &'static [&'static str] {
    match route {
        "/api/v1/logs/{log}" => &["luid"],
        "/api/v1/logs/{log}/regions" => &["luid", "state", "start", "limit"],
        "/api/v1/logs/{log}/requests" => &["luid", "limit", "type"],
        "/api/v1/kernel/slow" => &["limit", "all"],
        _ => &[],
    }
}

async fn check_query(
    matched: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let allowed = allowed_params(matched.as_str());
    if let Some(query) = req.uri().query() {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if !allowed.contains(&key) {
                let takes = if allowed.is_empty() {
                    "it takes no query parameters".to_string()
                } else {
                    format!("it takes {}", allowed.join(", "))
                };
                let shown: String = key.chars().take(64).collect();
                return ApiError::bad_request(format!(
                    "unknown query parameter {shown:?} for {}: {takes}",
                    matched.as_str()
                ))
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// `/`: where to go from here.
async fn landing() -> Response {
    let body = concat!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ulog-agent</title></head><body>",
        "<h1>ulog-agent</h1><p>Userspace server of the device-mapper userspace dirty log.</p><ul>",
        "<li><a href=\"/metrics\">/metrics</a> (Prometheus)</li>",
        "<li><a href=\"/api/v1/agent\">/api/v1/agent</a>, <a href=\"/api/v1/logs\">/api/v1/logs</a>, ",
        "<a href=\"/api/v1/kernel/slow\">/api/v1/kernel/slow</a> (JSON)</li>",
        "<li><a href=\"/healthz\">/healthz</a>, <a href=\"/readyz\">/readyz</a></li></ul></body></html>\n"
    );
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    no_store(r)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method) -> Response {
    let mut r = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed: the API is read-only (GET, HEAD)"),
    )
    .into_response();
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

/// Runs blocking work (bitmap walks, sysfs reads, encoding) on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("handler failed: {e}")))
}

fn health(status: StatusCode, word: &str, reason: Option<String>) -> Response {
    no_store((status, Json(Health { status: word.into(), reason })).into_response())
}

/// Why the receive loop is not healthy, if it is not.
fn stalled(tel: &Telemetry) -> Option<String> {
    tel.receive_loop_stall(clock::now_ns())
        .map(|idle| format!("the receive loop has not run for {:.1} s", idle as f64 / 1e9))
}

async fn healthz(State(app): State<App>) -> Response {
    match stalled(&app.tel) {
        None => health(StatusCode::OK, "ok", None),
        Some(why) => health(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", Some(why)),
    }
}

async fn readyz(State(app): State<App>) -> Response {
    let not_ready = match app.tel.lifecycle() {
        Lifecycle::Starting => Some("starting: the receive loop is not running yet".to_string()),
        Lifecycle::Stopping => Some("stopping: flushing logs before exit".to_string()),
        Lifecycle::Serving => stalled(&app.tel),
    };
    match not_ready {
        None => health(StatusCode::OK, "ready", None),
        Some(why) => health(StatusCode::SERVICE_UNAVAILABLE, "not_ready", Some(why)),
    }
}

async fn metrics(State(app): State<App>) -> Result<Response, ApiError> {
    let ex = Arc::clone(&app.exporter);
    let body = blocking(move || ex.render()).await?;
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(no_store(r))
}

async fn agent(State(app): State<App>) -> Result<Response, ApiError> {
    let tel = Arc::clone(&app.tel);
    Ok(json(blocking(move || model::agent(&tel)).await?))
}

async fn logs(State(app): State<App>) -> Result<Response, ApiError> {
    let tel = Arc::clone(&app.tel);
    let list = blocking(move || tel.logs().iter().map(|h| model::summary(h, &tel)).collect::<Vec<_>>()).await?;
    Ok(json(serde_json::json!({ "logs": list })))
}

/// The address a request came from (set per connection by [`serve_on`]).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// `POST /api/v1/cluster/confirm-fenced`: the operator's word that a node's kernel is dead.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmFenced {
    /// The dead node's corosync node id.
    pub node: u32,
    /// The kernel incarnation (boot id, 32 hex digits) that is dead; default: the one the log
    /// holds for that node (what `ulog-agent status` shows).
    pub incarnation: Option<String>,
    /// Only this log (name or uuid); default: every cluster log that holds the node.
    pub log: Option<String>,
}

/// Confirms that a departed node's kernel is dead (fenced), so its held marks are reclaimed:
/// its regions go out of sync and are resynchronised first. Refused unless the request comes
/// from this host (loopback): a wrong confirmation lets a survivor resync regions a still
/// running kernel writes. Answers which logs got the confirmation (it takes effect once this
/// member is live in a quorate group).
async fn confirm_fenced(
    State(app): State<App>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    Json(body): Json<ConfirmFenced>,
) -> Result<Response, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a fencing confirmation is accepted only from this host (loopback)".to_string(),
        ));
    }
    let Some(sink) = app.tel.cluster_control() else {
        return Err(ApiError::new(StatusCode::CONFLICT, "not_cluster", "the agent is not in cluster mode".to_string()));
    };
    let wanted = match &body.incarnation {
        Some(s) => Some(
            u128::from_str_radix(&s.replace('-', ""), 16)
                .map_err(|_| ApiError::bad_request(format!("incarnation {s:?} is not a boot id (32 hex digits)")))?,
        ),
        None => None,
    };
    let logs: Vec<Arc<LogHandle>> = match &body.log {
        Some(key) => vec![find(&app.tel, key, None)?],
        None => app.tel.logs().iter().cloned().collect(),
    };
    let mut confirmed = Vec::new();
    for h in logs.iter().filter(|h| h.cluster.is_some()) {
        let Some(view) = &h.cluster else { continue };
        let held = view.status().nodes.into_iter().find(|n| n.node == body.node && !n.live);
        let incarnation = match (wanted, held) {
            (Some(w), _) => w,
            (None, Some(n)) => u128::from_str_radix(&n.incarnation, 16).unwrap_or(0),
            (None, None) => continue,
        };
        let mut group = h.uuid.as_bytes().to_vec();
        group.push(0);
        if !sink(crate::cluster::engine::Command::ConfirmFenced { group, node: body.node, incarnation }) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "engine_gone",
                "the cluster engine is gone".to_string(),
            ));
        }
        warn!(log = %h.tel.name, node = body.node, incarnation = %format!("{incarnation:032x}"), %peer, "operator confirmed a node fenced");
        confirmed.push(serde_json::json!({ "log": &*h.tel.name, "uuid": h.uuid, "node": body.node, "incarnation": format!("{incarnation:032x}") }));
    }
    if confirmed.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "node_not_held",
            format!("no cluster log holds a departed node {} (nothing to reclaim)", body.node),
        ));
    }
    Ok(json(serde_json::json!({ "confirmed": confirmed })))
}

/// The log named `key` (its name or its uuid), the one with `luid` if given, else the resumed
/// one (else the newest) of the logs sharing the name.
fn find(tel: &Telemetry, key: &str, luid: Option<&str>) -> Result<Arc<LogHandle>, ApiError> {
    let luid = luid
        .map(|s| {
            parse_luid(s).ok_or_else(|| {
                ApiError::bad_request(format!("luid {s:?} is not a number (0x-prefixed hex or decimal)"))
            })
        })
        .transpose()?;
    let logs = tel.logs();
    let found =
        primary(logs.iter().filter(|h| (&*h.tel.name == key || h.uuid == key) && luid.is_none_or(|l| h.luid == l)));
    found.cloned().ok_or_else(|| {
        let what = match luid {
            Some(l) => format!("no log named {key:?} with luid {}", model::luid_hex(l)),
            None => format!("no log named {key:?} (a log's name or its dm uuid)"),
        };
        ApiError::new(StatusCode::NOT_FOUND, "log_not_found", what)
    })
}

async fn log(State(app): State<App>, LogKey(key): LogKey, Q(q): Q<LogQuery>) -> Result<Response, ApiError> {
    let h = find(&app.tel, &key, q.luid.as_deref())?;
    let tel = Arc::clone(&app.tel);
    Ok(json(blocking(move || model::detail(&h, &tel)).await?))
}

async fn log_regions(State(app): State<App>, LogKey(key): LogKey, Q(q): Q<RegionsQuery>) -> Result<Response, ApiError> {
    let h = find(&app.tel, &key, q.luid.as_deref())?;
    let filter = match q.state.as_deref() {
        None | Some("all") => None,
        Some(s) => Some(s.parse::<RegionState>().map_err(|()| {
            ApiError::bad_request(format!("state {s:?} is not one of clean, dirty, out_of_sync, all"))
        })?),
    };
    let limit = q.limit.unwrap_or(REGIONS_DEFAULT_LIMIT);
    if !(1..=REGIONS_MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit {limit} is not in 1..={REGIONS_MAX_LIMIT}")));
    }
    let start = q.start.unwrap_or(0);
    if start > h.region_count {
        return Err(ApiError::bad_request(format!("start {start} is beyond the log's {} regions", h.region_count)));
    }
    let page = blocking(move || {
        let p = match &h.cluster {
            Some(view) => regions::list_cluster(view, h.region_count, start, limit, filter, REGIONS_SCAN_BUDGET),
            None => regions::list(&h.shared, h.region_count, start, limit, filter, REGIONS_SCAN_BUDGET),
        };
        RegionPage {
            log: h.tel.name.to_string(),
            luid: model::luid_hex(h.luid),
            state: filter.map(|s| s.name().to_string()),
            start,
            limit,
            regions: p.regions.iter().map(|&(region, s)| RegionJson { region, state: s.name().to_string() }).collect(),
            next: p.next,
        }
    })
    .await?;
    Ok(json(page))
}

async fn log_requests(
    State(app): State<App>,
    LogKey(key): LogKey,
    Q(q): Q<RequestsQuery>,
) -> Result<Response, ApiError> {
    let h = find(&app.tel, &key, q.luid.as_deref())?;
    let limit = q.limit.unwrap_or(FLIGHT_SLOTS);
    if !(1..=FLIGHT_SLOTS).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit {limit} is not in 1..={FLIGHT_SLOTS}")));
    }
    let kind = match q.kind.as_deref() {
        None => None,
        Some(t) => Some(
            ulog_common::RequestType::ALL
                .into_iter()
                .find(|k| k.name() == t)
                .ok_or_else(|| ApiError::bad_request(format!("type {t:?} is not a request type name (e.g. IN_SYNC)")))?
                .raw(),
        ),
    };
    // Lock, copy the ring (a few KiB, into room reserved beforehand), unlock; sort and format
    // outside.
    let mut recs = Vec::with_capacity(FLIGHT_SLOTS);
    h.shared.lock().flight.copy_into(&mut recs);
    let requests = newest_first(recs, limit, kind).iter().map(RequestRecord::of).collect();
    Ok(json(RequestLog {
        log: h.tel.name.to_string(),
        luid: model::luid_hex(h.luid),
        capacity: FLIGHT_SLOTS,
        requests,
    }))
}

async fn kernel_slow(State(app): State<App>, Q(q): Q<SlowQuery>) -> Result<Response, ApiError> {
    use crate::telemetry::correlate::{RECENT_KEPT, SLOW_KEPT};
    let all = q.all.unwrap_or(false);
    let capacity = if all { RECENT_KEPT } else { SLOW_KEPT };
    let limit = q.limit.unwrap_or(capacity);
    if !(1..=capacity).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit {limit} is not in 1..={capacity}")));
    }
    let (threshold_ns, recs) = match app.tel.kernel_source() {
        Some(src) => src.recent_requests(!all),
        // Never attached: nothing kept yet, but the threshold is the configured one.
        None => (app.tel.slow_threshold_ns(), Vec::new()),
    };
    Ok(json(model::KernelRequests {
        attached: app.tel.probe_attached(),
        threshold_seconds: threshold_ns as f64 / 1e9,
        capacity,
        kind: if all { "all" } else { "slow" }.into(),
        requests: recs.iter().take(limit).map(model::KernelRequest::of).collect(),
    }))
}

/// Binds `addr` (retrying every 5 s while that fails) and serves the API until the runtime
/// stops.
pub async fn serve(tel: Arc<Telemetry>, addr: SocketAddr) {
    let mut failures = 0u64;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                if failures.is_multiple_of(60) {
                    warn!(%addr, error = %e, "cannot listen for the HTTP API (metrics, status); retrying every 5 s, the log server is unaffected");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let local = listener.local_addr().ok();
    tel.set_http_addr(local);
    info!(addr = %local.map_or_else(|| addr.to_string(), |a| a.to_string()), "HTTP API listening (/metrics, /healthz, /readyz, /api/v1)");
    serve_on(listener, router(tel)).await;
}

/// Serves `app` on a bound listener with the connection limits of the module docs.
pub async fn serve_on(listener: tokio::net::TcpListener, app: Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "HTTP connection refused: {MAX_CONNECTIONS} connections open");
            drop(stream);
            continue;
        };
        // The peer's address, for the endpoints only local processes may use.
        let svc = TowerToHyperService::new(app.clone().layer(axum::Extension(Peer(peer))));
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                }
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
                }
            }
            drop(permit);
        });
    }
}
