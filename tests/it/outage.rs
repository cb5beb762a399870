//! MariaDB restarted under load (Kafka mode): ingest keeps answering from the queue, the intake
//! and the dispatcher wait for the database, and everything answered 202 is delivered.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_notify::config::Secret;
use api_notify::receiver::{self, Receiver};
use api_notify::server::Roles;
use reqwest::StatusCode;
use serde_json::json;

use crate::private::PrivateMariadb;
use crate::support::{Gateway, Mode, any_port, config, notification};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_restarted_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = PrivateMariadb::start();
    let mut c = config(Mode::Kafka, "dbrestart", &dir).await;
    c.database.url = Secret::new(db.url());
    let g = Gateway::start(c, Roles::ALL).await;
    let r = Receiver::start(any_port(), receiver::always_ok())
        .await
        .unwrap();
    let ledger: Arc<Mutex<HashSet<String>>> = Arc::default();

    let post = |range: std::ops::Range<usize>| {
        let (client, ledger, target) = (g.client.clone(), ledger.clone(), r.addr());
        async move {
            for i in range {
                let n = notification(&format!("db-{i}"), "acme", &[target], json!({"i": i}));
                let (code, body) = client.post(&n).await;
                if code == StatusCode::ACCEPTED {
                    ledger
                        .lock()
                        .unwrap()
                        .insert(body["id"].as_str().unwrap().to_string());
                }
            }
        }
    };
    post(0..50).await;
    db.pause();
    post(50..100).await; // accepted by the queue while the store is down
    let during = ledger.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.resume();
    post(100..150).await;

    let ledger = ledger.lock().unwrap().clone();
    assert!(
        during >= 100,
        "ingest keeps accepting while MariaDB is down: {during}"
    );
    let all = r
        .wait_until(Duration::from_secs(60), |log| {
            let seen: HashSet<_> = log.iter().filter_map(|x| x.webhook_id.clone()).collect();
            ledger.iter().all(|id| seen.contains(id))
        })
        .await;
    assert!(
        all,
        "every notification answered 202 is delivered after MariaDB returns"
    );
    let repeats = r.counts().values().filter(|n| **n > 1).count();
    assert_eq!(repeats, 0, "a database restart repeats nothing");
    g.stop().await;
}
