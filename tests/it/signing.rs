//! Signed delivery end to end (Kafka + MariaDB): the Standard Webhooks plugin signs exactly the
//! bytes the receiver gets, checked here by an implementation independent of the plugin.

use std::time::Duration;

use api_notify::plugin::{KeyConfig, Secret};
use api_notify::receiver::{self, Receiver};
use api_notify::server::Roles;
use base64::Engine;
use hmac::Mac;
use reqwest::StatusCode;
use serde_json::json;
use sha2::Digest;

use crate::support::{Gateway, Mode, any_port, config};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn verify(r: &receiver::Received) -> bool {
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine.decode(SECRET.trim_start_matches("whsec_")).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", header("webhook-id"), header("webhook-timestamp")).as_bytes());
    mac.update(&r.body);
    let expected = format!("v1,{}", engine.encode(mac.finalize().into_bytes()));
    header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_bodies_arrive_byte_for_byte_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(Mode::Kafka, "signing", &dir).await;
    let plugin_dir = dir.path().join("plugins.d").join("p-sign-01");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins.d/shop-north");
    std::fs::copy(example.join("plugin.wasm"), plugin_dir.join("plugin.wasm")).unwrap();
    std::fs::copy(example.join("plugin.toml"), plugin_dir.join("plugin.toml")).unwrap();
    c.plugins.dir = dir.path().join("plugins.d");
    let key = KeyConfig {
        hmac_secret: Some(Secret::new(SECRET)),
        ..Default::default()
    };
    c.plugins.keys.insert("shop_north_signing".into(), key);
    let g = Gateway::start(c, Roles::ALL).await;
    let r = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    let port = r.addr().port();

    // BR-01: a JSON body whose re-serialisation would differ (order, big integer, escapes).
    let json_body = r#"{"zeta":1,"alpha":{"b":2,"a":1},"price":1.10,"big":12345678901234567890123,"url":"https:\/\/example.test\/x","n":1e2,"empty":{}}"#;
    let br01 = format!(
        r#"{{"request_id":"br01-0001","partner_id":"p-sign-01","endpoints":[{{"ip":"127.0.0.1","port":{port},"path":"/hook"}}],"headers":{{"content-type":"application/json"}},"body":{json_body}}}"#
    );
    // BR-02: a string body with multibyte text, a raw U+2028 and an escape kept as text.
    let text = "{\"name\":\"Zoë 😀\",\"sep\":\"\u{2028}\",\"esc\":\"\\u00e9\"}";
    let br02 = json!({"request_id": "br02-0001", "partner_id": "p-sign-01",
        "endpoints": [{"ip": "127.0.0.1", "port": port, "path": "/hook"}],
        "headers": {"content-type": "application/json; charset=utf-8"}, "body": text});
    let (code, _) = g.client.post_raw(br01, "application/json").await.unwrap();
    assert_eq!(code, StatusCode::ACCEPTED);
    let (code, _) = g.client.post(&br02).await;
    assert_eq!(code, StatusCode::ACCEPTED);

    for id in ["br01-0001", "br02-0001"] {
        let status = g
            .client
            .wait_for_state(id, "delivered", Duration::from_secs(30))
            .await;
        let version = status["attempt_log"][0]["plugin_version"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            version.len(),
            16,
            "the attempt records the plugin version: {status}"
        );
    }
    let got = r.received();
    let first = got
        .iter()
        .find(|x| x.request_id.as_deref() == Some("br01-0001"))
        .unwrap();
    assert_eq!(
        first.body.as_ref(),
        json_body.as_bytes(),
        "the JSON body arrives exactly as sent"
    );
    assert!(
        verify(first),
        "the signature verifies over the received bytes"
    );
    let second = got
        .iter()
        .find(|x| x.request_id.as_deref() == Some("br02-0001"))
        .unwrap();
    assert_eq!(
        second.body.len(),
        47,
        "the string body is its 47 UTF-8 bytes"
    );
    let digest = hex::encode(sha2::Sha256::digest(&second.body));
    assert_eq!(
        digest, "3c25b32a19fa4e14f3af615b2f13a0d137453619ea21891f69614406ffd5d259",
        "no transcoding"
    );
    assert!(verify(second), "the signature verifies over multibyte text");
    let (_, metrics) = g.client.get_text("/metrics").await;
    let calls = r#"api_notify_plugin_calls_total{outcome="ok",partner_id="p-sign-01"} 2"#;
    assert!(
        metrics.contains(calls),
        "two successful plugin calls are counted:\n{metrics}"
    );
    g.stop().await;
}
