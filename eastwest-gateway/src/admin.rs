//! What the gateway tells operators: readiness on 15021, Prometheus metrics on
//! 15090, and the loaded config on the localhost-only admin port 15000.

use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::json;
use sidecar::http_endpoint::{Handler, Reply};

use crate::proxy::Shared;
use crate::reload::Status;

/// `/healthz/ready`: 200 while serving; 503 once draining, and, with `--xds`,
/// until the first routes from the controller have arrived (as an Istio gateway
/// is not ready before its first config), so no traffic is sent to a gateway
/// that would refuse it all.
pub fn health(shared: Arc<Shared>) -> Handler {
    Arc::new(move |method: &Method, path: &str| match (method, path) {
        (&Method::GET, "/healthz/ready") if shared.drain.is_draining() => {
            Reply::status(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        (&Method::GET, "/healthz/ready") if shared.settings.xds.is_some() && !shared.xds_synced() => Reply::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for routes from the controller\n",
        ),
        (&Method::GET, "/healthz/ready") => Reply::text("ready\n"),
        _ => Reply::status(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// `/stats/prometheus` (Istio's path) and `/metrics`.
pub fn metrics(shared: Arc<Shared>) -> Handler {
    Arc::new(move |method: &Method, path: &str| match (method, path) {
        (&Method::GET, "/stats/prometheus" | "/metrics") => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: shared.metrics.render().into(),
        },
        _ => Reply::status(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// `/config_dump`: settings, routes with endpoint health, and the last reload error.
pub fn admin(shared: Arc<Shared>, status: Arc<Status>) -> Handler {
    Arc::new(move |method: &Method, path: &str| match (method, path) {
        (&Method::GET, "/config_dump") => {
            let s = &shared.settings;
            let last_error = status.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let body = json!({
                "settings": {
                    "listen": s.listen.to_string(),
                    "network": s.network.as_str(),
                    "cluster": s.cluster.as_str(),
                    "routes_file": s.routes_file.as_ref().map(|p| p.display().to_string()),
                    "xds": s.xds,
                    "xds_connected": shared.metrics.xds_connected.get() == 1,
                    "workers": s.workers,
                    "max_connections": s.max_connections,
                    "handshake_timeout_ms": s.handshake_timeout.as_millis() as u64,
                    "connect_timeout_ms": s.connect_timeout.as_millis() as u64,
                    "connect_attempts": s.connect_attempts,
                    "idle_timeout_ms": s.idle_timeout.as_millis() as u64,
                    "drain_timeout_ms": s.drain_timeout.as_millis() as u64,
                    "max_hello_bytes": s.max_hello_bytes,
                    "copy_mode": format!("{:?}", s.copy_mode).to_lowercase(),
                    "yield_before_sleep": s.yield_before_sleep,
                },
                "last_reload_error": last_error,
                "draining": shared.drain.is_draining(),
                "open_connections": shared.drain.open(),
                "routes": shared.routes.load().dump()["routes"],
            });
            Reply::json(serde_json::to_vec_pretty(&body).expect("JSON values serialise"))
        }
        (&Method::GET, "/") => Reply::text("/config_dump\n"),
        _ => Reply::status(StatusCode::NOT_FOUND, "not found\n"),
    })
}
