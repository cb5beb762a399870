//! Integration tests of the plugin subsystem, in one test binary.
//!
//! `sandbox` and `reload` use plugins written as component text (`wat`); `guests` builds the
//! example plugins in `plugins/` for `wasm32-wasip2` once per run.

mod guests;
mod reload;
mod sandbox;
mod support;
mod wat;
