//! The `api-notify` command: parses arguments, sets up logging, hands over to the library.

use clap::Parser;

use api_notify::cli::{Cli, run};
use api_notify::telemetry;

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
