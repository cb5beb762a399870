//! api-notify: a notification gateway.
//!
//! Callers `POST /v1/notifications`; the [`api`] hands each one to the [`queue`] (Kafka, or an
//! in-process intake in embedded mode); the intake stores it in the [`store`] with a unique
//! `request_id`; [`dispatch`]ers claim due rows under a lease and POST them to the partner's
//! endpoints, retrying on a schedule kept in the database. [`server::run`] wires the roles.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod guard;
pub mod metrics;
pub mod model;
pub mod plugin;
pub mod queue;
pub mod receiver;
pub mod server;
pub mod store;
pub mod telemetry;
