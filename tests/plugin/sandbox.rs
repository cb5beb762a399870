//! Hostile plugins: each is contained as a `PluginError` and the gateway keeps serving others.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use api_notify::plugin::{PluginError, Plugins, plugin_check};

use crate::support::{PluginDir, SPEC_SECRET, request, wasm};
use crate::wat;

/// Bound on any single plugin call in these tests, so a broken deadline fails instead of hanging.
const CALL_BOUND: Duration = Duration::from_secs(10);

/// Loads `fixture` for partner `hostile` and a well-behaved plugin for partner `good`.
fn load_with(
    fixture: &str,
    dir: &PluginDir,
    config: &api_notify::plugin::PluginsConfig,
) -> Plugins {
    dir.install("hostile", &wasm(fixture), "");
    dir.install("good", &wasm(&wat::echo_version("good")), "");
    Plugins::load(config).expect("the test config is valid")
}

async fn hostile_call(plugins: &Plugins) -> PluginError {
    let call = plugins.transform(request("hostile", 2));
    let outcome = tokio::time::timeout(CALL_BOUND, call)
        .await
        .expect("a plugin call must end");
    let result = outcome.expect("partner `hostile` should have a plugin loaded");
    result.expect_err("the hostile plugin's call should fail")
}

async fn assert_good_partner_still_served(plugins: &Plugins) {
    let outcome = plugins.transform(request("good", 2)).await;
    let transformed = outcome
        .expect("partner `good` has a plugin")
        .expect("the good plugin works");
    assert_eq!(
        transformed.request.headers,
        [("x-version".to_owned(), "good".to_owned())],
        "the well-behaved plugin should still run after a hostile one failed"
    );
}

#[tokio::test]
async fn infinite_loop_is_stopped_by_the_deadline() {
    let dir = PluginDir::new();
    let plugins = load_with(&wat::infinite_loop(false), &dir, &dir.config());

    let error = hostile_call(&plugins).await;
    assert_eq!(
        error,
        PluginError::Timeout { limit_ms: 50 },
        "the loop should end as a timeout"
    );
    assert_good_partner_still_served(&plugins).await;
}

// One worker: if the plugin ran on it, the ticker could not run until the call ended. Both tasks
// are spawned, since the test body itself runs on the main thread, not on the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_looping_plugin_does_not_stall_other_tasks() {
    assert_loops_do_not_stall(1).await;
}

// Two workers: one call may run in place on a worker, the second must go to the blocking pool,
// so the ticker keeps a worker while both loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_looping_calls_on_two_workers_leave_one_worker_free() {
    assert_loops_do_not_stall(2).await;
}

async fn assert_loops_do_not_stall(calls: usize) {
    let dir = PluginDir::new();
    let plugins = load_with(&wat::infinite_loop(false), &dir, &dir.config());
    let ticks = Arc::new(AtomicU32::new(0));
    let ticker = tokio::spawn(count_milliseconds(Arc::clone(&ticks)));

    let caller = tokio::spawn(async move {
        for _ in 0..5_000 {
            if ticks.load(Ordering::Relaxed) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let before = ticks.load(Ordering::Relaxed);
        let loops: Vec<_> = (0..calls)
            .map(|_| {
                let plugins = plugins.clone();
                tokio::spawn(async move { hostile_call(&plugins).await })
            })
            .collect();
        let mut errors = Vec::new();
        for one in loops {
            errors.push(one.await.expect("a calling task should not panic"));
        }
        (errors, ticks.load(Ordering::Relaxed) - before)
    });
    let (errors, ticks_during_call) = caller.await.expect("the calling task should not panic");
    ticker.abort();

    for error in errors {
        assert_eq!(
            error,
            PluginError::Timeout { limit_ms: 50 },
            "each loop should end as a timeout"
        );
    }
    assert!(
        ticks_during_call > 0,
        "other tasks should keep running while {calls} plugin call(s) spin"
    );
}

/// Counts milliseconds (at most 10 000) into `ticks`.
async fn count_milliseconds(ticks: Arc<AtomicU32>) {
    for _ in 0..10_000 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        ticks.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_plugin_that_loops_on_the_probe_is_never_loaded() {
    let dir = PluginDir::new();
    let plugins = load_with(&wat::infinite_loop(true), &dir, &dir.config());

    assert!(
        plugins.transform(request("hostile", 2)).await.is_none(),
        "the looping plugin should be rejected at load"
    );
    assert_eq!(
        plugins.stats().rejected_total,
        1,
        "the rejection should be counted"
    );
}

#[tokio::test]
async fn memory_growth_past_the_cap_is_a_memory_limit_error() {
    let dir = PluginDir::new();
    let plugins = load_with(&wat::memory_bomb(), &dir, &dir.config());

    let error = hostile_call(&plugins).await;
    assert_eq!(
        error,
        PluginError::MemoryLimit {
            limit_bytes: 32 << 20
        },
        "the bomb should hit the 32 MiB cap"
    );
    assert_good_partner_still_served(&plugins).await;
}

#[tokio::test]
async fn a_100_mib_body_is_rejected() {
    let dir = PluginDir::new();
    let config = api_notify::plugin::PluginsConfig {
        memory_bytes: 128 << 20,
        ..dir.config()
    };
    let plugins = load_with(&wat::huge_body(), &dir, &config);

    let error = hostile_call(&plugins).await;
    assert!(
        matches!(&error, PluginError::InvalidOutput(reason) if reason.contains("body")),
        "a 100 MiB body should be rejected as invalid output, got {error}"
    );
}

#[tokio::test]
async fn a_trap_is_a_plugin_error_and_the_gateway_keeps_serving() {
    let dir = PluginDir::new();
    let plugins = load_with(&wat::trap(), &dir, &dir.config());

    let error = hostile_call(&plugins).await;
    assert!(
        matches!(error, PluginError::Trap(_)),
        "unreachable should surface as a trap, got {error}"
    );
    assert_eq!(
        PluginError::CLASS,
        "plugin",
        "plugin failures should be of attempt class `plugin`"
    );
    assert_good_partner_still_served(&plugins).await;

    let next = plugins.transform(request("hostile", 1)).await;
    let recovered = next.expect("partner `hostile` still has its plugin");
    assert!(
        recovered.is_ok(),
        "the trapped instance should be replaced by a fresh one"
    );
}

#[tokio::test]
async fn a_guest_error_is_reported_with_its_message() {
    let dir = PluginDir::new();
    let plugins = load_with(&wat::guest_error(), &dir, &dir.config());

    let error = hostile_call(&plugins).await;
    assert_eq!(
        error,
        PluginError::Guest("other: nope".to_owned()),
        "the guest's own error should be kept"
    );
}

#[tokio::test]
async fn a_forbidden_method_is_rejected() {
    let dir = PluginDir::new();
    let plugins = load_with(&wat::wrong_method(), &dir, &dir.config());

    let error = hostile_call(&plugins).await;
    assert!(
        matches!(&error, PluginError::InvalidOutput(reason) if reason.contains("GET")),
        "GET should be refused as output, got {error}"
    );
}

#[tokio::test]
async fn wrong_world_missing_export_and_file_imports_are_rejected_at_load() {
    let dir = PluginDir::new();
    dir.install("wrong-world", &wasm(wat::wrong_world()), "");
    dir.install("no-export", &wasm(wat::no_export()), "");
    dir.install("wants-files", &wasm(wat::wants_files()), "");
    let plugins = Plugins::load(&dir.config()).expect("the test config is valid");

    for partner_id in ["wrong-world", "no-export", "wants-files"] {
        assert!(
            plugins.version(partner_id).is_none(),
            "{partner_id} should not be loaded"
        );
    }
    assert_eq!(
        plugins.stats().rejected_total,
        3,
        "each rejection should be counted"
    );
}

#[tokio::test]
async fn a_key_not_granted_is_refused_and_no_key_bytes_leak() {
    let dir = PluginDir::new();
    dir.install(
        "asker",
        &wasm(&wat::uses_key("other-key")),
        "keys = [\"spec\"]\n",
    );
    let plugins = Plugins::load(&dir.config()).expect("the test config is valid");

    let outcome = plugins
        .transform(request("asker", 2))
        .await
        .expect("partner `asker` has a plugin");
    let error = outcome.expect_err("signing with another partner's key must fail");
    let shown = format!("{error} {error:?}");
    assert!(
        shown.contains("`other-key` is not granted"),
        "the refusal should name the key: {shown}"
    );
    assert!(
        !shown.contains(SPEC_SECRET.trim_start_matches("whsec_")),
        "no secret text in errors: {shown}"
    );
}

#[tokio::test]
async fn plugin_check_names_the_file_of_a_broken_plugin() {
    let dir = PluginDir::new();
    dir.install("broken", &wasm(wat::wrong_world()), "");
    let path = dir.partner_dir("broken").join("plugin.wasm");

    let error = plugin_check(&path, None, None, &dir.config())
        .await
        .expect_err("a wrong world fails the check");
    assert!(
        format!("{error:#}").contains(&path.display().to_string()),
        "the error should name {}",
        path.display()
    );
}

#[tokio::test]
async fn plugin_check_prints_the_transformed_request() {
    let dir = PluginDir::new();
    dir.install("fine", &wasm(&wat::echo_version("7")), "");

    let text = plugin_check(&dir.partner_dir("fine"), None, None, &dir.config())
        .await
        .expect("the echo plugin passes");
    assert!(
        text.contains("x-version: 7"),
        "the output should show the plugin's header:\n{text}"
    );
    assert!(
        text.contains("partner: fine"),
        "the partner should default to the directory name:\n{text}"
    );
}

#[tokio::test]
async fn plugin_check_runs_the_request_from_a_file() {
    let dir = PluginDir::new();
    dir.install("fine", &wasm(&wat::echo_version("7")), "");
    let request_file = dir.root.path().join("request.json");
    let request = r#"{"url": "http://127.0.0.1:18001/hook", "body": "{\"order\":\"B-2\"}"}"#;
    std::fs::write(&request_file, request).expect("the request file can be written");

    let text = plugin_check(
        &dir.partner_dir("fine"),
        Some("acme"),
        Some(&request_file),
        &dir.config(),
    )
    .await
    .expect("the echo plugin passes");
    assert!(
        text.contains("POST http://127.0.0.1:18001/hook"),
        "the file's URL should be used:\n{text}"
    );
    assert!(
        text.contains(r#"{"order":"B-2"}"#),
        "the file's body should be shown:\n{text}"
    );
    assert!(
        text.contains("partner: acme"),
        "--partner should be used:\n{text}"
    );
}
