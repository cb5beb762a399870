//! Per-call cost of the Standard Webhooks signer plugin against native HMAC in the same process.
//!
//! Run: `plugins/build.sh && cargo run --release --example plugin_bench`
//! Prints µs per call for 1 KiB and 64 KiB bodies, sequential and with 2 concurrent callers,
//! and the time to load (compile, pre-instantiate, probe) the plugin. For a profile of where the
//! time goes it also times an echo plugin written in component text (fixed cost of a call: slot,
//! blocking thread, store, instantiation, copying the request in and out, validation) and a bare
//! `spawn_blocking` round trip.

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
    let echo_dir = dir.path().join("echo");
    std::fs::create_dir_all(&echo_dir)?;
    std::fs::write(echo_dir.join("plugin.wasm"), wat::parse_str(ECHO)?)?;

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
    let warm = Plugins::load(&config)?;
    println!(
        "load (compile + pre-instantiate + probe): {:.1} ms",
        ms(started.elapsed())
    );
    let fresh = Plugins::load(&PluginsConfig {
        warm_instances: 0,
        ..config
    })?;
    println!(
        "spawn_blocking round trip: {:.1} µs",
        spawn_blocking_us().await?
    );
    println!("block_in_place: {:.1} µs", block_in_place_us());

    for (name, plugins) in [
        ("warm instances", &warm),
        ("fresh instance per call", &fresh),
    ] {
        println!("{name}:");
        for body_bytes in [1 << 10, 64 << 10] {
            report(plugins, body_bytes).await?;
        }
    }
    Ok(())
}

async fn report(plugins: &Plugins, body_bytes: usize) -> anyhow::Result<()> {
    let native = native_us(body_bytes);
    let sequential = plugin_us(plugins, "bench", body_bytes, 1).await?;
    let concurrent = plugin_us(plugins, "bench", body_bytes, 2).await?;
    let echo = plugin_us(plugins, "echo", body_bytes, 1).await?;
    println!(
        "  body {:>2} KiB: native signing {native:.1} µs, signer plugin {sequential:.1} µs \
         (added {:.1} µs), with 2 callers {concurrent:.1} µs wall, echo plugin {echo:.1} µs",
        body_bytes >> 10,
        sequential - native
    );
    Ok(())
}

fn request(partner_id: &str, body_bytes: usize) -> OutboundRequest {
    OutboundRequest {
        method: "POST".to_owned(),
        url: "http://127.0.0.1:18001/hook".to_owned(),
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: vec![b'x'; body_bytes],
        partner_id: partner_id.to_owned(),
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
async fn plugin_us(
    plugins: &Plugins,
    partner_id: &'static str,
    body_bytes: usize,
    callers: u32,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let plugins = plugins.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..CALLS / callers {
                let outcome = plugins.transform(request(partner_id, body_bytes)).await;
                let result = outcome.expect("the partner has a plugin");
                result.expect("the plugin works");
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

fn block_in_place_us() -> f64 {
    let started = Instant::now();
    for _ in 0..CALLS {
        tokio::task::block_in_place(|| std::hint::black_box(()));
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS)
}

async fn spawn_blocking_us() -> anyhow::Result<f64> {
    let started = Instant::now();
    for _ in 0..CALLS {
        tokio::task::spawn_blocking(|| ()).await?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS))
}

/// A plugin that returns the request it is given: the fixed cost of a call.
const ECHO: &str = r#"(component
  (type $req' (record (field "method" string) (field "url" string)
    (field "headers" (list (tuple string string))) (field "body" (list u8))
    (field "partner-id" string) (field "request-id" string) (field "notification-id" string)
    (field "attempt" u32)))
  (export $req "outbound-request" (type $req'))
  (type $err' (variant (case "bad-config" string) (case "host-call" string)
    (case "bad-request" string) (case "other" string)))
  (export $err "plugin-error" (type $err'))
  (core module $m
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $ptr i32)
      (local.set $ptr (i32.and (i32.add (global.get $next) (i32.sub (local.get 2) (i32.const 1)))
                               (i32.sub (i32.const 0) (local.get 2))))
      (global.set $next (i32.add (local.get $ptr) (local.get 3)))
      (if (i32.gt_u (global.get $next) (i32.mul (memory.size) (i32.const 65536)))
        (then (drop (memory.grow (i32.add (i32.const 1)
          (i32.div_u (i32.sub (global.get $next) (i32.mul (memory.size) (i32.const 65536)))
                     (i32.const 65536)))))))
      (local.get $ptr))
    (func (export "transform")
      (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      (i32.store8 (i32.const 256) (i32.const 0))
      (i32.store (i32.const 260) (local.get 0)) (i32.store (i32.const 264) (local.get 1))
      (i32.store (i32.const 268) (local.get 2)) (i32.store (i32.const 272) (local.get 3))
      (i32.store (i32.const 276) (local.get 4)) (i32.store (i32.const 280) (local.get 5))
      (i32.store (i32.const 284) (local.get 6)) (i32.store (i32.const 288) (local.get 7))
      (i32.store (i32.const 292) (local.get 8)) (i32.store (i32.const 296) (local.get 9))
      (i32.store (i32.const 300) (local.get 10)) (i32.store (i32.const 304) (local.get 11))
      (i32.store (i32.const 308) (local.get 12)) (i32.store (i32.const 312) (local.get 13))
      (i32.store (i32.const 316) (local.get 14))
      (i32.const 256)))
  (core instance $i (instantiate $m))
  (func $transform (param "req" $req) (result (result $req (error $err)))
    (canon lift (core func $i "transform") (memory (core memory $i "memory"))
      (realloc (core func $i "realloc"))))
  (export "transform" (func $transform)))"#;
