//! The example plugins in `plugins/`, built for `wasm32-wasip2` once per run, checked against the
//! Standard Webhooks vectors (BR-02, BR-03, BR-04) and an independent verifier written here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use api_notify::plugin::{OutboundRequest, Plugins, PluginsConfig, Transformed};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::support::{ED25519_SEED, PluginDir, ROTATED_SECRET, SPEC_SECRET};

/// Builds `plugins/` once per test run and returns the directory holding `<name>.wasm`.
fn dist() -> &'static Path {
    static DIST: OnceLock<PathBuf> = OnceLock::new();
    DIST.get_or_init(|| {
        let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
        // The guests have their own target directory (build.sh's default), never the gateway's.
        let mut build = Command::new(plugins.join("build.sh"));
        match std::env::var_os("API_NOTIFY_GUEST_TARGET_DIR") {
            Some(dir) => build.env("CARGO_TARGET_DIR", dir),
            None => build.env_remove("CARGO_TARGET_DIR"),
        };
        let output = build.output().expect("plugins/build.sh can be started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "building the example plugins failed (if the target is missing: \
             `rustup target add wasm32-wasip2`):\n{stderr}"
        );
        plugins.join("dist")
    })
}

fn guest(name: &str) -> Vec<u8> {
    let path = dist().join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|error| panic!("{} should exist after the build: {error}", path.display()))
}

/// Loads guest `name` for partner `p` with `manifest`, seeing the fixed time `now_unix_secs`.
fn load(name: &str, manifest: &str, now_unix_secs: u64) -> (PluginDir, Plugins) {
    load_tuned(name, manifest, now_unix_secs, |_| {})
}

/// [`load`] with the test config changed by `tune`.
fn load_tuned(
    name: &str,
    manifest: &str,
    now_unix_secs: u64,
    tune: impl FnOnce(&mut PluginsConfig),
) -> (PluginDir, Plugins) {
    let dir = PluginDir::new();
    dir.install("p", &guest(name), manifest);
    let clock = Arc::new(move || now_unix_secs * 1000);
    let mut config = dir.config();
    tune(&mut config);
    let plugins = Plugins::load_with_clock(&config, clock).expect("the test config is valid");
    assert!(
        plugins.version("p").is_some(),
        "guest {name} should load with manifest:\n{manifest}"
    );
    (dir, plugins)
}

fn signed_request(notification_id: &str, body: &[u8]) -> OutboundRequest {
    OutboundRequest {
        method: "POST".to_owned(),
        url: "http://127.0.0.1:18001/hook".to_owned(),
        headers: vec![("Webhook-Id".to_owned(), "msg_spoofed".to_owned())],
        body: body.to_vec(),
        partner_id: "p".to_owned(),
        request_id: "r".to_owned(),
        notification_id: notification_id.to_owned(),
        attempt: 1,
    }
}

async fn run(plugins: &Plugins, request: OutboundRequest) -> Transformed {
    let outcome = plugins
        .transform(request)
        .await
        .expect("partner p has a plugin");
    outcome.unwrap_or_else(|error| panic!("the plugin call should succeed: {error}"))
}

fn header<'a>(transformed: &'a Transformed, name: &str) -> Vec<&'a str> {
    let headers = transformed.request.headers.iter();
    headers
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Standard Webhooks signature computed here, independently of the plugin.
fn expected_v1(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = BASE64
        .decode(secret.trim_start_matches("whsec_"))
        .expect("test secrets are base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn signer_matches_the_standard_webhooks_spec_vector() {
    let (_dir, plugins) = load(
        "standard-webhooks",
        "keys = [\"spec\"]\n[config]\nkeys = \"spec\"\n",
        1_614_265_330,
    );
    let body = br#"{"test": 2432232314}"#;

    let signed = run(
        &plugins,
        signed_request("msg_p5jXN8AQM9LWM0D4loKWxJek", body),
    )
    .await;
    let signature = header(&signed, "webhook-signature");

    assert_eq!(
        signature,
        ["v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="],
        "spec vector should match"
    );
    for wrong in [
        "v1,TcxlhK9b6UD6iVI1ZU2tTqp8PEVfYRseNNfa6b+LcUg=",
        "v1,ELhqG0Ku1gwOc1f4jyKdp3SFGFLAOdJ9bvpWLciCakI=",
    ] {
        assert_ne!(
            signature,
            [wrong],
            "the secret must be base64-decoded, not used as text (BR-03)"
        );
    }
    let expected = expected_v1(
        SPEC_SECRET,
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1_614_265_330,
        body,
    );
    assert_eq!(
        signature,
        [expected.as_str()],
        "an independent HMAC should verify the signature"
    );
    assert_eq!(
        header(&signed, "webhook-id"),
        ["msg_p5jXN8AQM9LWM0D4loKWxJek"],
        "one webhook-id, the gateway's"
    );
    assert_eq!(
        header(&signed, "webhook-timestamp"),
        ["1614265330"],
        "timestamp in seconds from the host clock"
    );
}

#[tokio::test]
async fn signer_gives_the_same_signature_on_warm_and_fresh_instances() {
    let manifest = "keys = [\"spec\"]\n[config]\nkeys = \"spec\"\n";
    let body = br#"{"test": 2432232314}"#;
    let expected = ["v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="];

    for warm_instances in [32, 0] {
        // One sign call per plugin call: a reused instance must get its budget back each time.
        let (_dir, plugins) = load_tuned("standard-webhooks", manifest, 1_614_265_330, |config| {
            config.warm_instances = warm_instances;
            config.max_sign_calls = 1;
        });
        for call in 1..=3 {
            let signed = run(
                &plugins,
                signed_request("msg_p5jXN8AQM9LWM0D4loKWxJek", body),
            )
            .await;
            let signature = header(&signed, "webhook-signature");
            assert_eq!(
                signature, expected,
                "call {call} with {warm_instances} warm instances"
            );
        }
    }
}

#[tokio::test]
async fn signer_signs_unicode_bodies_byte_for_byte() {
    let (_dir, plugins) = load(
        "standard-webhooks",
        "keys = [\"spec\"]\n[config]\nkeys = \"spec\"\n",
        1_700_000_000,
    );
    let body = "{\"name\":\"Zoë 😀\",\"sep\":\"\u{2028}\",\"esc\":\"\\u00e9\"}".as_bytes();
    assert_eq!(body.len(), 47, "the BR-02 body should be 47 bytes");

    let signed = run(&plugins, signed_request("msg_test_unicode_01", body)).await;

    assert_eq!(
        header(&signed, "webhook-signature"),
        ["v1,gpeBf/b6Vn71Eig4OWS5yDmy5zNF7KJORdrXtqDTwK8="],
        "BR-02 vector"
    );
    assert_eq!(
        signed.request.body, body,
        "the body should pass through unchanged"
    );
}

#[tokio::test]
async fn signer_emits_one_signature_per_key_during_rotation() {
    let manifest = "keys = [\"spec\", \"rotated\"]\n[config]\nkeys = \"spec rotated\"\n";
    let (_dir, plugins) = load("standard-webhooks", manifest, 1_700_000_001);
    let body = br#"{"k":"v"}"#;

    let signed = run(&plugins, signed_request("msg_rot", body)).await;

    let old = expected_v1(SPEC_SECRET, "msg_rot", 1_700_000_001, body);
    let new = expected_v1(ROTATED_SECRET, "msg_rot", 1_700_000_001, body);
    assert_eq!(
        header(&signed, "webhook-signature"),
        [format!("{old} {new}")],
        "exactly `v1,<old> v1,<new>` (BR-04)"
    );
}

#[tokio::test]
async fn signer_adds_a_verifiable_ed25519_signature_when_configured() {
    let (_dir, plugins) = load(
        "standard-webhooks",
        "keys = [\"ed\"]\n[config]\ned25519_keys = \"ed\"\n",
        1_700_000_002,
    );

    let signed = run(&plugins, signed_request("msg_ed", b"{}")).await;

    let value = header(&signed, "webhook-signature").concat();
    let encoded = value
        .strip_prefix("v1a,")
        .expect("an Ed25519 signature should be tagged v1a");
    let signature = ed25519_dalek::Signature::from_slice(&BASE64.decode(encoded).expect("base64"))
        .expect("the signature should be 64 bytes");
    let seed: [u8; 32] = BASE64
        .decode(ED25519_SEED)
        .expect("base64")
        .try_into()
        .expect("32 bytes");
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    let verified = public.verify_strict(b"msg_ed.1700000002.{}", &signature);
    assert!(
        verified.is_ok(),
        "the v1a signature should verify with the public key"
    );
}

#[tokio::test]
async fn signer_without_a_granted_key_is_rejected_at_load() {
    let dir = PluginDir::new();
    dir.install(
        "p",
        &guest("standard-webhooks"),
        "keys = [\"spec\"]\n[config]\nkeys = \"other-key\"\n",
    );
    let plugins = Plugins::load(&dir.config()).expect("the test config is valid");

    assert!(
        plugins.version("p").is_none(),
        "a signer asking for a key not granted should fail its probe"
    );
    assert_eq!(
        plugins.stats().rejected_total,
        1,
        "the rejection should be counted"
    );
}

#[tokio::test]
async fn json_envelope_embeds_the_body_bytes_unchanged() {
    let (_dir, plugins) = load(
        "json-envelope",
        "[config]\nevent_type = \"order.paid\"\n",
        1_700_000_003,
    );
    let body = br#"{"big":12345678901234567890123,"n":1e2}"#;

    let wrapped = run(&plugins, signed_request("msg_env", body)).await;

    let expected = r#"{"type":"order.paid","id":"msg_env","timestamp":1700000003,"attempt":1,"data":{"big":12345678901234567890123,"n":1e2}}"#;
    assert_eq!(
        String::from_utf8_lossy(&wrapped.request.body),
        expected,
        "the envelope should wrap the raw body"
    );
}

#[tokio::test]
async fn header_mapper_removes_renames_and_adds() {
    let manifest = "[config]\nremove = \"webhook-id\"\nrename = \"content-type: x-original-type\"\nadd = \"x-env: prod\"\n";
    let (_dir, plugins) = load("header-mapper", manifest, 0);
    let mut request = signed_request("msg_map", b"{}");
    request
        .headers
        .push(("Content-Type".to_owned(), "application/json".to_owned()));

    let mapped = run(&plugins, request).await;

    let expected = [("x-original-type", "application/json"), ("x-env", "prod")];
    let headers: Vec<(&str, &str)> = mapped
        .request
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        headers, expected,
        "headers should be removed, renamed and added in that order"
    );
}

#[tokio::test]
async fn template_adds_its_greeting() {
    let (_dir, plugins) = load("template", "[config]\ngreeting = \"hi\"\n", 0);

    let greeted = run(&plugins, signed_request("msg_t", b"{}")).await;

    assert_eq!(
        header(&greeted, "x-greeting"),
        ["hi"],
        "the template should add its configured greeting"
    );
}
