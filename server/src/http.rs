//! HTTP: the web console (`/`, [`crate::console`]), `GET /health` (the pipelines' health, JSON), `GET /metrics` (Prometheus text
//! format), and on a cluster `GET /cluster/views/{view}` (a view's rows in this process,
//! for the other processes; they present the cluster's secret).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::console::Console;
use crate::engine::{Engine, PARTS_HEADER, PeerAnswer};

/// Serves until the process ends.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    console: Arc<Console>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/cluster/views/{view}", get(view_parts))
        .with_state(engine)
        .merge(console.routes());
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// `{"status": "ok" | "failing", "pipelines": [{"name", "kind", "status", "cause"?,
/// "restarts", "last_failure"?}]}`. Always 200 while the server serves: a failed pipeline
/// is restarted (or reported) by the server itself, not a reason to restart the process.
async fn health(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    use weir_runtime::pipeline::PipelineStatus;
    let mut rows = engine.pipelines();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let failing = rows
        .iter()
        .any(|r| matches!(r.status, PipelineStatus::Failed(_)));
    let pipelines: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut row = serde_json::json!({
                "name": r.name,
                "kind": r.kind.to_string(),
                "status": match &r.status {
                    PipelineStatus::Running => "running",
                    PipelineStatus::Finished => "finished",
                    PipelineStatus::Stopped => "stopped",
                    PipelineStatus::Failed(_) => "failed",
                },
                "restarts": r.restarts.0,
            });
            if let PipelineStatus::Failed(f) = &r.status {
                row["cause"] = f.cause.clone().into();
            }
            if let Some(last) = &r.restarts.1 {
                row["last_failure"] = last.clone().into();
            }
            row
        })
        .collect();
    let body = serde_json::json!({
        "status": if failing { "failing" } else { "ok" },
        "pipelines": pipelines,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
}

async fn metrics(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics().encode(),
    )
}

async fn view_parts(
    State(engine): State<Arc<Engine>>,
    Path(view): Path<String>,
    headers: HeaderMap,
) -> axum::response::Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match engine.view_parts(&view, token).await {
        PeerAnswer::Parts { parts, body } => (
            [
                (
                    header::CONTENT_TYPE,
                    "application/vnd.apache.arrow.stream".to_string(),
                ),
                (header::HeaderName::from_static(PARTS_HEADER), parts),
            ],
            body,
        )
            .into_response(),
        PeerAnswer::Unauthorized => StatusCode::UNAUTHORIZED.into_response(),
        PeerAnswer::NotFound => StatusCode::NOT_FOUND.into_response(),
        PeerAnswer::Failed(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}
