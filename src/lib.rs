//! api-notify library.
pub mod plugin;
