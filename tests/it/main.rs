//! Integration tests: one binary, real services.
//!
//! Kafka-mode tests run against the MariaDB and the Kafka-protocol broker that `scripts/test`
//! starts (it exports `API_NOTIFY_TEST_MYSQL` and `API_NOTIFY_TEST_KAFKA`); embedded-mode tests
//! use a SQLite file in a temporary directory. Receivers are local recording servers.

#![allow(unreachable_pub)] // a test binary exports nothing

mod api;
mod config;
mod docs;
mod metrics;
mod outage;
mod pipeline;
mod plugins_live;
mod policy;
mod private;
mod processes;
mod readiness;
mod secrets;
mod signing;
mod support;

/// Plugins written as component text, shared with the plugin sandbox tests.
#[allow(dead_code)]
#[path = "../plugin/wat.rs"]
mod wat;
