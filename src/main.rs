//! The `api-notify` command: parses arguments, sets up logging, hands over to the library.

use clap::Parser;

use api_notify::cli::{Cli, run};
use api_notify::telemetry;

/// mimalloc instead of glibc's allocator: the hot path allocates many short-lived buffers
/// (request bodies, JSON, SQL arguments) across threads, where glibc's malloc/free showed as
/// ~17 % of the gateway's CPU in `perf` (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _log_guard = telemetry::init(
        cli.log_format,
        cli.default_log_level(),
        cli.log_dir.as_deref(),
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
