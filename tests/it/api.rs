//! The ingest API through the router (no socket): bad input gets a 4xx JSON error naming the
//! field, and nothing is stored.

use std::sync::Arc;

use api_notify::api::{AppState, router};
use api_notify::config::DatabaseConfig;
use api_notify::config::Secret;
use api_notify::guard::AddressGuard;
use api_notify::model::Limits;
use api_notify::queue::{EmbeddedQueue, Queue, run_embedded_intake};
use api_notify::store::Store;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

async fn app(dir: &tempfile::TempDir) -> (axum::Router, Store) {
    app_with_tokens(dir, api_notify::api::auth::Tokens::default()).await
}

async fn app_with_tokens(
    dir: &tempfile::TempDir,
    tokens: api_notify::api::auth::Tokens,
) -> (axum::Router, Store) {
    let config = DatabaseConfig {
        url: Secret::new(format!("sqlite://{}", dir.path().join("api.db").display())),
        ..DatabaseConfig::default()
    };
    let store = Store::connect(&config).await.expect("sqlite store");
    store.migrate().await.expect("migrations");
    let (queue, intake) = EmbeddedQueue::new(64);
    tokio::spawn(run_embedded_intake(
        intake,
        store.clone(),
        Arc::default(),
        64,
        Arc::default(),
    ));
    let state = AppState {
        queue: Queue::Embedded(queue),
        store: store.clone(),
        limits: Limits::default(),
        guard: AddressGuard::new(vec!["127.0.0.0/8".parse().unwrap()]),
        max_request_bytes: 64 * 1024,
        metrics: Arc::default(),
        config: api_notify::config::Config::default(),
        tokens,
    };
    (router(Arc::new(state)), store)
}

async fn call(
    app: &axum::Router,
    content_type: &str,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let request = Request::post("/v1/notifications")
        .header("content-type", content_type)
        .body(body.into())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

const GOOD: &str = r#"{"request_id":"a-1","partner_id":"acme","endpoints":[{"ip":"127.0.0.1","port":9}],"body":{"x":1}}"#;

#[tokio::test]
async fn bad_input_is_answered_with_the_field_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (app, store) = app(&dir).await;
    let cases: [(&str, String, StatusCode, &str); 7] = [
        (
            "text/plain",
            GOOD.to_string(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "",
        ),
        (
            "application/json",
            "{not json".into(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "application/json",
            GOOD.replace("127.0.0.1", "localhost"),
            StatusCode::BAD_REQUEST,
            "endpoints[0].ip",
        ),
        (
            "application/json",
            GOOD.replace("127.0.0.1", "169.254.169.254"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "endpoints[0].ip",
        ),
        (
            "application/json",
            GOOD.replace("\"port\":9", "\"port\":0"),
            StatusCode::BAD_REQUEST,
            "endpoints[0].port",
        ),
        (
            "application/json",
            GOOD.replace("\"partner_id\":\"acme\",", ""),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "application/json",
            GOOD.replace("{\"x\":1}", &format!("\"{}\"", "x".repeat(70 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
        ),
    ];
    for (content_type, body, status, field) in cases {
        let (got, answer) = call(&app, content_type, body.clone()).await;
        assert_eq!(got, status, "{}: {answer}", &body[..body.len().min(120)]);
        assert!(
            answer["error"]["message"].is_string(),
            "error JSON with a message expected: {answer}"
        );
        if !field.is_empty() {
            assert_eq!(
                answer["error"]["field"], field,
                "the wrong field should be named: {answer}"
            );
        }
    }
    let backlog = store.backlog().await.unwrap();
    assert_eq!(
        backlog.pending, 0,
        "nothing should be stored from rejected input"
    );
    let (got, answer) = call(&app, "application/json", GOOD).await;
    assert_eq!(
        got,
        StatusCode::ACCEPTED,
        "the valid request is accepted: {answer}"
    );
    assert_eq!(
        store.backlog().await.unwrap().pending,
        1,
        "the accepted notification is stored"
    );
}

#[tokio::test]
async fn unknown_request_id_is_404_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(&dir).await;
    let request = Request::get("/v1/notifications/nope")
        .body(Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "unknown request_id should be 404"
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).expect("JSON error body");
    assert_eq!(body["error"]["code"], "not_found");
}

#[test]
fn example_config_parses_and_matches_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config.toml");
    let text = std::fs::read_to_string(&path).expect("examples/config.toml exists");
    let parsed: api_notify::config::Config = toml::from_str(&text).expect("example config parses");
    let defaults = api_notify::config::Config::default();
    assert_eq!(
        toml::to_string(&parsed).unwrap(),
        toml::to_string(&defaults).unwrap(),
        "examples/config.toml should document exactly the defaults"
    );
}

async fn get(app: &axum::Router, path: &str) -> (StatusCode, String, String) {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn openapi_and_metrics_routes_serve_their_documents() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(&dir).await;
    let (status, content_type, body) = get(&app, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK, "/openapi.json should answer 200");
    assert!(
        content_type.starts_with("application/json"),
        "/openapi.json should be JSON: {content_type}"
    );
    assert_eq!(
        body,
        api_notify::api::openapi_json(),
        "/openapi.json should serve the generated document"
    );

    let (code, _) = call(&app, "application/json", GOOD).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "a good notification is accepted"
    );
    let (status, content_type, body) = get(&app, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "/metrics should answer 200");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "/metrics should use the Prometheus text format: {content_type}"
    );
    assert!(
        body.contains("api_notify_ingest_requests_total{outcome=\"accepted\"} 1"),
        "the accepted ingest should be counted: {body}"
    );
}

async fn call_with_token(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> StatusCode {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    response.status()
}

#[tokio::test]
async fn tokens_are_required_and_scoped_to_partners_and_admin_routes() {
    use api_notify::api::auth::{Tokens, hash_token};
    use api_notify::config::TokenConfig;
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app_with_tokens(
        &dir,
        Tokens::new(&[
            TokenConfig {
                name: "billing".into(),
                sha256: hash_token("t-billing"),
                partners: vec!["acme".into()],
                admin: false,
            },
            TokenConfig {
                name: "ops".into(),
                sha256: hash_token("t-ops"),
                partners: vec![],
                admin: true,
            },
        ]),
    )
    .await;
    let other = GOOD.replace("\"acme\"", "\"globex\"").replace("a-1", "a-2");
    assert_eq!(
        call_with_token(&app, "POST", "/v1/notifications", None, GOOD).await,
        StatusCode::UNAUTHORIZED,
        "no token, 401"
    );
    assert_eq!(
        call_with_token(&app, "POST", "/v1/notifications", Some("wrong"), GOOD).await,
        StatusCode::UNAUTHORIZED,
        "unknown token, 401"
    );
    assert_eq!(
        call_with_token(&app, "POST", "/v1/notifications", Some("t-billing"), &other).await,
        StatusCode::FORBIDDEN,
        "other partner, 403"
    );
    assert_eq!(
        call_with_token(&app, "POST", "/v1/notifications", Some("t-billing"), GOOD).await,
        StatusCode::ACCEPTED,
        "own partner, 202"
    );
    assert_eq!(
        call_with_token(
            &app,
            "POST",
            "/v1/notifications/a-1/replay",
            Some("t-billing"),
            "{}"
        )
        .await,
        StatusCode::FORBIDDEN,
        "replay needs admin"
    );
    assert_eq!(
        call_with_token(&app, "GET", "/v1/partners/acme", Some("t-ops"), "").await,
        StatusCode::OK,
        "admin reads partner state"
    );
    assert_eq!(
        call_with_token(&app, "GET", "/healthz", None, "").await,
        StatusCode::OK,
        "health needs no token"
    );
}
