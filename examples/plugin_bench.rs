//! Per-call cost of the Standard Webhooks signer plugin against native HMAC in the same process.
//!
//! Run: `plugins/build.sh && cargo run --release --example plugin_bench`
//! Prints µs per call for 1 KiB and 64 KiB bodies, sequential and with 2 concurrent callers,
//! and the time to load (compile, pre-instantiate, probe) the plugin.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use api_notify::plugin::{KeyConfig, OutboundRequest, Plugins, PluginsConfig, Secret};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const CALLS: u32 = 5_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let partner_dir = dir.path().join("bench");
    std::fs::create_dir_all(&partner_dir)?;
    let wasm = std::fs::read("plugins/dist/standard-webhooks.wasm").map_err(|e| {
        anyhow::anyhow!("plugins/dist/standard-webhooks.wasm: {e}; run plugins/build.sh first")
    })?;
    std::fs::write(partner_dir.join("plugin.wasm"), wasm)?;
    std::fs::write(
        partner_dir.join("plugin.toml"),
        "keys = [\"k\"]\n[config]\nkeys = \"k\"\n",
    )?;

    let key = KeyConfig {
        hmac_secret: Some(Secret::new(SECRET)),
        ed25519_seed: None,
    };
    let config = PluginsConfig {
        dir: dir.path().to_path_buf(),
        keys: BTreeMap::from([("k".to_owned(), key)]),
        ..PluginsConfig::default()
    };
    let started = Instant::now();
    let plugins = Plugins::load(&config)?;
    println!(
        "load (compile + pre-instantiate + probe): {:.1} ms",
        ms(started.elapsed())
    );

    for body_bytes in [1 << 10, 64 << 10] {
        let native = native_us(body_bytes);
        let sequential = plugin_us(&plugins, body_bytes, 1).await?;
        let concurrent = plugin_us(&plugins, body_bytes, 2).await?;
        println!(
            "body {:>3} KiB: native HMAC {native:.1} µs/call, plugin {sequential:.1} µs/call \
             (added {:.1} µs), 2 callers {concurrent:.1} µs/call wall",
            body_bytes >> 10,
            sequential - native
        );
    }
    Ok(())
}

fn request(body_bytes: usize) -> OutboundRequest {
    OutboundRequest {
        method: "POST".to_owned(),
        url: "http://127.0.0.1:18001/hook".to_owned(),
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: vec![b'x'; body_bytes],
        partner_id: "bench".to_owned(),
        request_id: "r".to_owned(),
        notification_id: "msg_bench".to_owned(),
        attempt: 1,
    }
}

/// Native Standard Webhooks signing of the same content, including the base64 step.
fn native_us(body_bytes: usize) -> f64 {
    let key = base64::engine::general_purpose::STANDARD
        .decode(&SECRET[6..])
        .expect("base64 secret");
    let body = vec![b'x'; body_bytes];
    let started = Instant::now();
    for _ in 0..CALLS {
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        mac.update(b"msg_bench.1700000000.");
        mac.update(&body);
        let encoded = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        std::hint::black_box(encoded);
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS)
}

/// Wall time per call with `callers` tasks calling at once.
async fn plugin_us(plugins: &Plugins, body_bytes: usize, callers: u32) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let plugins = plugins.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..CALLS / callers {
                let outcome = plugins.transform(request(body_bytes)).await;
                outcome
                    .expect("partner bench has a plugin")
                    .expect("the signer works");
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS))
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e3
}
