//! HTTP: `GET /health` (the pipelines' health, JSON) and `GET /metrics` (Prometheus text
//! format).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::engine::Engine;

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(engine);
    axum::serve(listener, app).await
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
