//! `api-notify demo`: the whole pipeline on one machine in a few seconds.
//!
//! Starts an embedded gateway (SQLite in a temporary directory) and a recording receiver on
//! 127.0.0.1, sends `examples/notifications.jsonl` through the real HTTP API (including a repeat,
//! a conflicting repeat, and an endpoint that is down so delivery fails over), makes the receiver
//! refuse one notification's first attempt, and prints what happened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::receiver::{Receiver, Reply};
use crate::server::{self, Roles};

const SAMPLES: &str = include_str!("../examples/notifications.jsonl");
/// The Standard Webhooks signer, built from `plugins/standard-webhooks` (also the load tool's).
pub(crate) const SIGNER_WASM: &[u8] =
    include_bytes!("../examples/plugins.d/shop-north/plugin.wasm");
const SIGNER_TOML: &str = include_str!("../examples/plugins.d/shop-north/plugin.toml");
/// The partner whose deliveries are signed, and the public test secret of the Standard
/// Webhooks specification used as its key.
const SIGNED_PARTNER: &str = "shop-north";
const DEMO_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The sample file's receiver port and its "down" port, rewritten to live ones.
const SAMPLE_PORT: u16 = 18081;
const SAMPLE_DOWN_PORT: u16 = 18099;
/// This notification's first attempt is answered 503, to show a retry.
const REFUSED_ONCE: &str = "ord-100231-shipped";

/// Runs the demo and prints its story to standard output.
pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let receiver = Receiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), refuse_once()).await?;
    let down_port = closed_port().await?;
    let config = demo_config(dir.path())?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let gateway = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server::run(
        config,
        Roles::ALL,
        Some(listener),
        shutdown.clone(),
    ));

    println!("api-notify demo");
    println!("  gateway  {gateway}  (embedded: SQLite + in-process intake)");
    println!(
        "  receiver http://{}  (answers 503 once for {REFUSED_ONCE})",
        receiver.addr()
    );
    println!(
        "  down     127.0.0.1:{down_port}  (first endpoint of stock-SKU-77: nothing listens)\n"
    );

    let client = reqwest::Client::new();
    let mut expected = Vec::new();
    println!("ingest: POST {gateway}/v1/notifications");
    for line in SAMPLES.lines().filter(|l| !l.trim().is_empty()) {
        let body = rewrite_ports(line, receiver.addr().port(), down_port);
        let (status, answer) = post(&client, &gateway, body).await?;
        let request_id = answer["request_id"]
            .as_str()
            .map_or_else(|| sent_id(line), str::to_string);
        let what = match status {
            202 => "accepted",
            200 => "repeat: already accepted, not queued again",
            409 => "conflict: same request_id, other content; refused",
            _ => "refused",
        };
        println!("  {status}  {request_id:<20} {what}");
        if status == 202 {
            expected.push(request_id);
        }
    }

    let all = expected.len();
    let delivered = receiver
        .wait_until(Duration::from_secs(30), |log| {
            let ok: std::collections::HashSet<_> = log
                .iter()
                .filter(|r| !(r.request_id.as_deref() == Some(REFUSED_ONCE) && r.seen_before == 0))
                .filter_map(|r| r.webhook_id.clone())
                .collect();
            ok.len() >= all
        })
        .await;
    print_received(&receiver);
    print_signatures(&receiver);
    print_attempts(&client, &gateway, "stock-SKU-77").await;
    print_attempts(&client, &gateway, REFUSED_ONCE).await;

    drop(client);
    shutdown.cancel();
    server.await.context("gateway task")??;
    anyhow::ensure!(
        delivered,
        "not every accepted notification was delivered within 30 s"
    );
    let counts = receiver.counts();
    println!(
        "\n{all} accepted, {} delivered once each by webhook-id (plus {} retried after a 503); \
         repeats and conflicts were not delivered.",
        counts.len(),
        counts.values().filter(|n| **n > 1).count()
    );
    Ok(())
}

fn demo_config(dir: &std::path::Path) -> anyhow::Result<Config> {
    let mut config = Config::default();
    let db = dir.join("demo.db");
    config.database.url = Secret::new(format!("sqlite://{}", db.display()));
    let partner_dir = dir.join("plugins.d").join(SIGNED_PARTNER);
    std::fs::create_dir_all(&partner_dir)?;
    std::fs::write(partner_dir.join("plugin.wasm"), SIGNER_WASM)?;
    std::fs::write(partner_dir.join("plugin.toml"), SIGNER_TOML)?;
    config.plugins.dir = dir.join("plugins.d");
    let key = crate::plugin::KeyConfig {
        hmac_secret: Some(crate::plugin::Secret::new(DEMO_SECRET)),
        ..Default::default()
    };
    config.plugins.keys.insert("shop_north_signing".into(), key);
    config.outbound.allow_cidrs = vec!["127.0.0.0/8".parse().expect("valid CIDR")];
    config.outbound.connect_timeout_ms = 1_000;
    config.outbound.request_timeout_ms = 5_000;
    config.retry.schedule_secs = vec![1, 2, 4];
    config.dispatch.poll_interval_ms = 50;
    Ok(config)
}

fn refuse_once() -> crate::receiver::Script {
    Arc::new(|r| {
        if r.request_id.as_deref() == Some(REFUSED_ONCE) && r.seen_before == 0 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
}

/// A loopback port with nothing listening.
async fn closed_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}

/// Points the sample's ports at the live receiver and the closed port, keeping every other byte.
fn rewrite_ports(line: &str, live: u16, down: u16) -> String {
    line.replace(
        &format!("\"port\": {SAMPLE_PORT}"),
        &format!("\"port\": {live}"),
    )
    .replace(
        &format!("\"port\": {SAMPLE_DOWN_PORT}"),
        &format!("\"port\": {down}"),
    )
}

fn sent_id(line: &str) -> String {
    let doc: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    doc["request_id"].as_str().unwrap_or("?").to_string()
}

async fn post(
    client: &reqwest::Client,
    gateway: &str,
    body: String,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = client
        .post(format!("{gateway}/v1/notifications"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or_default()))
}

fn print_received(receiver: &Receiver) {
    println!("\nreceiver got:");
    let start = receiver
        .received()
        .first()
        .map_or_else(Instant::now, |r| r.at);
    for r in receiver.received() {
        let ms = r.at.duration_since(start).as_millis();
        let answer = if r.request_id.as_deref() == Some(REFUSED_ONCE) && r.seen_before == 0 {
            503
        } else {
            200
        };
        let preview: String = String::from_utf8_lossy(&r.body).chars().take(48).collect();
        println!(
            "  +{ms:>5} ms  {answer}  {:<22} webhook-id {}  {} bytes  {preview}",
            r.path,
            r.webhook_id.as_deref().unwrap_or("-"),
            r.body.len()
        );
    }
}

/// Shows the signer's headers and checks each signature independently of the plugin.
fn print_signatures(receiver: &Receiver) {
    println!("\nsigned by the {SIGNED_PARTNER} plugin (verified here with the partner's secret):");
    for r in receiver
        .received()
        .iter()
        .filter(|r| r.path.contains(SIGNED_PARTNER))
    {
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let (id, ts, sig) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        );
        let verdict = if verify(&id, &ts, &r.body, &sig) {
            "valid"
        } else {
            "INVALID"
        };
        println!("  {id}  t={ts}  {sig}  {verdict}");
    }
}

/// Standard Webhooks verification: HMAC-SHA256 over `id.timestamp.body` with the decoded secret.
fn verify(id: &str, timestamp: &str, body: &[u8], signatures: &str) -> bool {
    use base64::Engine;
    use hmac::Mac;
    let engine = base64::engine::general_purpose::STANDARD;
    let Some(Ok(key)) = DEMO_SECRET.strip_prefix("whsec_").map(|k| engine.decode(k)) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key) else {
        return false;
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", engine.encode(mac.finalize().into_bytes()));
    signatures.split(' ').any(|s| s == expected)
}

async fn print_attempts(client: &reqwest::Client, gateway: &str, request_id: &str) {
    let url = format!("{gateway}/v1/notifications/{request_id}");
    let Ok(response) = client.get(&url).send().await else {
        return;
    };
    let status: serde_json::Value = response.json().await.unwrap_or_default();
    println!(
        "\nGET /v1/notifications/{request_id}: state {}",
        status["state"]
    );
    let attempts = status["attempt_log"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for a in attempts {
        let fields: BTreeMap<&str, String> = [
            "number",
            "endpoint",
            "status_code",
            "error",
            "plugin_version",
        ]
        .into_iter()
        .map(|k| (k, a[k].to_string()))
        .collect();
        println!(
            "  attempt {}  {}  status {}  plugin {}  {}",
            fields["number"],
            fields["endpoint"],
            fields["status_code"],
            fields["plugin_version"],
            fields["error"]
        );
    }
}
