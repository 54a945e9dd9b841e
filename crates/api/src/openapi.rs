//! The OpenAPI 3 document of this API, served at `/api/v1/openapi.json`.

use axum::Json;
use serde_json::Value;

/// The document lives in `docs/openapi.json` (edited beside the routes it describes).
pub async fn document() -> Json<Value> {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    Json(
        DOC.get_or_init(|| serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap_or(Value::Null))
            .clone(),
    )
}
