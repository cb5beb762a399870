//! Secrets stay secret: with a database password, an HMAC key and an API token configured, a run
//! with deliveries, receiver failures and plugin errors shows none of them in the logs, the API
//! answers, the metrics or the attempt log.

use std::process::{Command, Stdio};
use std::time::Duration;

use api_notify::receiver::{self, Receiver};
use serde_json::json;

use crate::support::{Client, Mode, any_port, closed_addr, config, notification};

use crate::wat;

const HMAC_SECRET: &str = "whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA==";
const TOKEN: &str = "ant_secret-token-value-for-the-leak-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configured_secrets_never_appear_in_logs_answers_metrics_or_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(Mode::Kafka, "secrets", &dir).await;
    // The test database user's password is the known marker for the database secret.
    let db_url = c.database.url.expose().to_string();
    let password = db_url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p.to_string())
        .expect("the test database URL carries a password");
    let plugins = dir.path().join("plugins.d");
    for (partner, text) in [("signed", None), ("broken", Some(wat::trap()))] {
        let partner_dir = plugins.join(partner);
        std::fs::create_dir_all(&partner_dir).unwrap();
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins.d/shop-north");
        let wasm = match text {
            Some(t) => ::wat::parse_str(t).unwrap(),
            None => std::fs::read(example.join("plugin.wasm")).unwrap(),
        };
        std::fs::write(partner_dir.join("plugin.wasm"), wasm).unwrap();
        std::fs::copy(example.join("plugin.toml"), partner_dir.join("plugin.toml")).unwrap();
    }

    let listen = closed_addr().await;
    let mut c = c;
    c.plugins.dir = plugins.clone();
    c.api.tokens = vec![api_notify::config::TokenConfig {
        name: "leak-test".into(),
        sha256: api_notify::api::auth::hash_token(TOKEN),
        partners: vec!["*".into()],
        admin: true,
    }];
    // Plugin keys serialize redacted, so the key is written by hand.
    let mut toml = toml::to_string(&c).unwrap();
    toml += &format!("\n[plugins.keys.shop_north_signing]\nhmac_secret = \"{HMAC_SECRET}\"\n");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &toml).unwrap();
    let log_path = dir.path().join("gateway.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_api-notify"))
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", &listen.to_string()])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    let ok = Receiver::start(any_port(), receiver::fail_first(1, 500))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let base_url = format!("http://{listen}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Ok(Some(status)) = child.try_wait() {
        panic!(
            "gateway exited {status}: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    Client::new(listen).wait_ready().await;
    let mut answers = String::new();
    let cases = [
        ("s-1", "signed", ok.addr()),
        ("b-1", "broken", ok.addr()),
        ("d-1", "down", closed_addr().await),
    ];
    for (id, partner, target) in &cases {
        let r = http
            .post(format!("{base_url}/v1/notifications"))
            .bearer_auth(TOKEN)
            .json(&notification(id, partner, &[*target], json!({"x": 1})))
            .send()
            .await
            .unwrap();
        answers += &r.text().await.unwrap();
    }
    let unauthorized = http
        .post(format!("{base_url}/v1/notifications"))
        .bearer_auth("wrong")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    answers += &unauthorized.text().await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (id, _, _) in &cases {
        let r = http
            .get(format!("{base_url}/v1/notifications/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        answers += &r.text().await.unwrap();
    }
    let metrics = http
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log_path).unwrap();

    assert!(
        answers.contains("attempt_log"),
        "the status answers were read: {answers}"
    );
    assert!(
        answers.contains("\"plugin\""),
        "a plugin error happened and was logged: {answers}"
    );
    let key_part = HMAC_SECRET.trim_start_matches("whsec_");
    for (what, text) in [
        ("logs", &logs),
        ("API answers", &answers),
        ("metrics", &metrics),
    ] {
        for secret in [password.as_str(), key_part, TOKEN] {
            assert!(!text.contains(secret), "a secret appears in the {what}");
        }
    }
}
