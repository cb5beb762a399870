//! Hot reload: new versions replace old ones atomically, broken ones never do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use api_notify::plugin::Plugins;
use tokio_util::sync::CancellationToken;

use crate::support::{PluginDir, eventually, request, wasm};
use crate::wat;

/// How long a completed file may take to serve, per the issue.
const RELOAD_BOUND: Duration = Duration::from_millis(500);

/// Bound for waiting on a rejection to be noticed (it leaves nothing else to poll for).
const REJECT_BOUND: Duration = Duration::from_secs(5);

async fn marker(plugins: &Plugins, partner_id: &str) -> Option<String> {
    let transformed = plugins.transform(request(partner_id, 1)).await?.ok()?;
    transformed
        .request
        .headers
        .into_iter()
        .find(|(name, _)| name == "x-version")
        .map(|(_, value)| value)
}

fn start(dir: &PluginDir) -> (Plugins, CancellationToken) {
    dir.install("p", &wasm(&wat::echo_version("1")), "");
    let plugins = Plugins::load(&dir.config()).expect("the test config is valid");
    let shutdown = CancellationToken::new();
    plugins.watch(shutdown.clone());
    (plugins, shutdown)
}

#[tokio::test]
async fn a_replaced_plugin_serves_within_half_a_second() {
    let dir = PluginDir::new();
    let (plugins, shutdown) = start(&dir);
    let old_version = plugins.version("p").expect("version 1 is loaded");

    dir.install("p", &wasm(&wat::echo_version("2")), "");
    let swapped = eventually(RELOAD_BOUND, async || {
        marker(&plugins, "p").await.as_deref() == Some("2")
    })
    .await;

    assert!(
        swapped,
        "version 2 should serve within {RELOAD_BOUND:?} of the file being complete"
    );
    assert_ne!(
        plugins.version("p"),
        Some(old_version),
        "the reported version should change with the file"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn removing_the_directory_returns_the_partner_to_plain_delivery() {
    let dir = PluginDir::new();
    let (plugins, shutdown) = start(&dir);

    std::fs::remove_dir_all(dir.partner_dir("p")).expect("the partner directory can be removed");
    let plain = eventually(RELOAD_BOUND, async || {
        plugins.transform(request("p", 1)).await.is_none()
    })
    .await;

    assert!(
        plain,
        "without a plugin directory transform should return None"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_broken_new_version_is_rejected_and_the_old_one_keeps_serving() {
    let dir = PluginDir::new();
    let (plugins, shutdown) = start(&dir);

    dir.install("p", &wasm(wat::wrong_world()), "");
    let rejected = eventually(REJECT_BOUND, async || plugins.stats().rejected_total == 1).await;

    assert!(rejected, "the wrong-world version should be rejected");
    assert_eq!(
        marker(&plugins, "p").await.as_deref(),
        Some("1"),
        "version 1 should keep serving"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_half_written_file_is_rejected_then_the_complete_one_loads() {
    let dir = PluginDir::new();
    let (plugins, shutdown) = start(&dir);
    let complete = wasm(&wat::echo_version("2"));
    let path = dir.partner_dir("p").join("plugin.wasm");

    std::fs::write(&path, &complete[..complete.len() / 2])
        .expect("half the file can be written in place");
    let rejected = eventually(REJECT_BOUND, async || plugins.stats().rejected_total == 1).await;
    assert!(
        rejected,
        "the half-written file should be rejected once it stopped changing"
    );
    assert_eq!(
        marker(&plugins, "p").await.as_deref(),
        Some("1"),
        "version 1 should keep serving"
    );

    std::fs::write(&path, &complete).expect("the rest of the file can be written");
    let swapped = eventually(RELOAD_BOUND, async || {
        marker(&plugins, "p").await.as_deref() == Some("2")
    })
    .await;
    assert!(swapped, "the completed file should be loaded");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_fails_while_a_plugin_is_swapped_under_load() {
    let dir = PluginDir::new();
    let (plugins, shutdown) = start(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(steady_load(
        plugins.clone(),
        Arc::clone(&stop),
        Arc::clone(&failures),
    ));

    dir.install("p", &wasm(&wat::echo_version("2")), "");
    let swapped = eventually(RELOAD_BOUND, async || {
        marker(&plugins, "p").await.as_deref() == Some("2")
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let calls = load.await.expect("the load task should not panic");

    assert!(swapped, "version 2 should serve during steady load");
    assert!(calls > 0, "the load task should have made calls");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no call should fail during the swap"
    );
    shutdown.cancel();
}

/// Calls partner `p` until `stop`, counting failures; returns the number of calls (at most 100 000).
async fn steady_load(plugins: Plugins, stop: Arc<AtomicBool>, failures: Arc<AtomicU64>) -> u64 {
    let mut calls = 0;
    while !stop.load(Ordering::Relaxed) && calls < 100_000 {
        if !matches!(plugins.transform(request("p", 1)).await, Some(Ok(_))) {
            failures.fetch_add(1, Ordering::Relaxed);
        }
        calls += 1;
    }
    calls
}

#[tokio::test]
async fn partners_serving_the_same_file_share_one_compiled_component() {
    let dir = PluginDir::new();
    let shared = wasm(&wat::echo_version("shared"));
    for partner in ["a", "b", "c"] {
        dir.install(partner, &shared, "");
    }
    dir.install("d", &wasm(&wat::echo_version("own")), "");
    let (plugins, shutdown) = start(&dir);

    let stats = plugins.stats();
    assert_eq!(
        stats.loaded_total, 5,
        "p, a, b, c and d are each in service"
    );
    assert_eq!(
        stats.compiled_components, 3,
        "a, b and c share one compiled file; p and d have their own"
    );
    for partner in ["a", "b", "c"] {
        assert_eq!(
            marker(&plugins, partner).await.as_deref(),
            Some("shared"),
            "partner {partner} runs the shared file"
        );
    }

    std::fs::remove_dir_all(dir.partner_dir("d")).expect("the partner directory can be removed");
    let forgotten = eventually(REJECT_BOUND, async || {
        plugins.stats().compiled_components == 2
    })
    .await;
    assert!(forgotten, "code no partner serves any more is dropped");
    shutdown.cancel();
}
