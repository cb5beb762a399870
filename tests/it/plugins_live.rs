//! Plugins inside a running gateway (Kafka + MariaDB): a hostile plugin's attempts fail with
//! class `plugin` while other partners keep being delivered, and a plugin replaced under steady
//! load is swapped without a failed delivery, the attempt log naming both versions.

use std::collections::HashSet;
use std::time::Duration;

use api_notify::receiver::{self, Receiver};
use api_notify::server::Roles;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Gateway, Mode, any_port, config, notification};

use crate::wat;

fn install(dir: &std::path::Path, partner: &str, component_text: &str) {
    let partner_dir = dir.join(partner);
    std::fs::create_dir_all(&partner_dir).unwrap();
    let bytes = ::wat::parse_str(component_text).expect("fixture compiles");
    // Written beside and renamed, as an operator's deploy would; the registry also copes with
    // half-written files (tests/plugin covers that).
    let staged = partner_dir.join("plugin.wasm.new");
    std::fs::write(&staged, bytes).unwrap();
    std::fs::rename(staged, partner_dir.join("plugin.wasm")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_plugin_is_contained_and_a_reload_under_load_fails_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    install(&plugins, "steady", &wat::echo_version("one"));
    install(&plugins, "hostile", &wat::trap());
    let mut c = config(Mode::Kafka, "pluginlive", &dir).await;
    c.plugins.dir = plugins.clone();
    let g = Gateway::start(c, Roles::ALL).await;
    let steady = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    let hostile = Receiver::start(any_port(), receiver::fail_first(1, 500))
        .await
        .unwrap();

    // The trap fixture behaves on attempt 1 and traps from attempt 2 on.
    let (code, _) = g
        .client
        .post(&notification(
            "hostile-1",
            "hostile",
            &[hostile.addr()],
            json!({}),
        ))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);

    let total = 200;
    for i in 0..total {
        if i == total / 2 {
            install(&plugins, "steady", &wat::echo_version("two"));
        }
        let n = notification(
            &format!("steady-{i}"),
            "steady",
            &[steady.addr()],
            json!({"i": i}),
        );
        let (code, _) = g.client.post(&n).await;
        assert_eq!(code, StatusCode::ACCEPTED);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let dead = g
        .client
        .wait_for_state("hostile-1", "dead", Duration::from_secs(30))
        .await;
    assert_eq!(
        dead["attempt_log"][1]["error_class"], "plugin",
        "a trap fails the attempt as plugin: {dead}"
    );
    let all = steady
        .wait_until(Duration::from_secs(30), |log| log.len() >= total)
        .await;
    assert!(
        all,
        "every steady notification is delivered while the other plugin traps"
    );

    let mut versions = Vec::new();
    for i in 0..total {
        let status = g
            .client
            .wait_for_state(&format!("steady-{i}"), "delivered", Duration::from_secs(10))
            .await;
        assert_eq!(
            status["attempts"], 1,
            "no failed delivery during the swap: {status}"
        );
        versions.push(
            status["attempt_log"][0]["plugin_version"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let distinct: HashSet<_> = versions.iter().collect();
    assert_eq!(
        distinct.len(),
        2,
        "the attempt log shows the version change: {distinct:?}"
    );
    assert_ne!(
        versions[0],
        versions[total - 1],
        "the last deliveries use the new version"
    );
    let markers: HashSet<String> = steady
        .received()
        .iter()
        .filter_map(|r| {
            r.headers
                .iter()
                .find(|(n, _)| n == "x-version")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(
        markers,
        HashSet::from(["one".to_string(), "two".to_string()]),
        "both versions ran"
    );
    g.stop().await;
}
