//! Command-line interface: argument definitions and one function per command.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server::{self, Roles};
use crate::store::Store;
use crate::telemetry::LogFormat;

/// api-notify: accepts notifications over HTTP and makes sure each partner receives its POST
/// once, through crashes, repeats and partner outages.
///
/// With no configuration it runs embedded (SQLite file, in-process intake). Give a config file
/// with [kafka] and a mysql:// database.url for the production path.
#[derive(Debug, Parser)]
#[command(name = "api-notify", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Also write logs to daily files `api-notify.log.YYYY-MM-DD` in this directory.
    #[arg(long, global = true, env = "API_NOTIFY_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// API token for send, status and replay.
    #[arg(long, global = true, env = "API_NOTIFY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (all roles unless --roles says otherwise).
    Serve {
        /// TOML configuration file; API_NOTIFY__SECTION__KEY variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address for the HTTP API (overrides api.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Roles to run: any of api,intake,dispatch.
        #[arg(long, default_value = "api,intake,dispatch")]
        roles: Roles,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start an embedded gateway and a local receiver, send the sample notifications, and
    /// print what the receiver got.
    Demo,
    /// Post notifications to a running gateway: FILE holds one JSON object, or JSON lines;
    /// `-` reads standard input.
    Send {
        #[arg(long, env = "API_NOTIFY_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        file: PathBuf,
    },
    /// Show the state and attempts of one notification.
    Status {
        #[arg(long, env = "API_NOTIFY_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        request_id: String,
    },
    /// Deliver again, with the same webhook-id: one notification by request id, or a range of
    /// a partner's finished notifications.
    Replay {
        #[arg(long, env = "API_NOTIFY_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The notification to replay.
        #[arg(required_unless_present = "partner", conflicts_with = "partner")]
        request_id: Option<String>,
        /// Replay a range of this partner's notifications.
        #[arg(long, requires_all = ["since", "until"])]
        partner: Option<String>,
        /// Accepted at or after: RFC 3339 time (2026-12-04T10:00:00Z) or milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// Accepted at or before: RFC 3339 time or milliseconds.
        #[arg(long)]
        until: Option<String>,
        /// `dead` or `delivered`.
        #[arg(long, default_value = "dead")]
        state: String,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Measure a gateway started in this process against a loopback receiver (see
    /// scripts/bench and docs/benchmarks.md).
    Bench(crate::bench::BenchArgs),
    /// WebAssembly plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print the effective values, secrets redacted.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `plugin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Validate a plugin, run it once under the gateway's limits on a sample request (or
    /// --request FILE), and print the request it produces.
    Check {
        /// The plugin's `.wasm` file (next to it, an optional `plugin.toml`).
        path: PathBuf,
        /// Partner id to run it as.
        #[arg(long)]
        partner: Option<String>,
        /// A JSON request to transform instead of the sample.
        #[arg(long)]
        request: Option<PathBuf>,
        /// Gateway configuration holding the keys the plugin may use.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new random token; prints it once, with the `[[api.tokens]]` entry to configure.
    New {
        /// Who will hold it (shown in logs).
        #[arg(long)]
        name: String,
        /// A partner id it may use; repeat for several; `*` for all.
        #[arg(long = "partner")]
        partners: Vec<String>,
        /// Allow operator routes (replay, partner state).
        #[arg(long)]
        admin: bool,
    },
}

impl Cli {
    /// The demo prints its own story; the server logs at info.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Demo | Command::Bench(_) => "warn",
            _ => "info",
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = api_client(cli.token.as_deref())?;
    match cli.command {
        Command::Serve {
            config,
            listen,
            roles,
        } => serve(config.as_deref(), listen, roles).await,
        Command::Migrate { config } => migrate(config.as_deref()).await,
        Command::Demo => crate::demo::run().await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Send { url, file } => send(&client, &url, &file).await,
        Command::Status { url, request_id } => status(&client, &url, &request_id).await,
        replay @ Command::Replay { .. } => run_replay(&client, replay).await,
        Command::Plugin {
            command:
                PluginCommand::Check {
                    path,
                    partner,
                    request,
                    config,
                },
        } => {
            let config = Config::load(config.as_deref())?;
            let report = crate::plugin::plugin_check(
                &path,
                partner.as_deref(),
                request.as_deref(),
                &config.plugins,
            )
            .await?;
            println!("{report}");
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::New {
                    name,
                    partners,
                    admin,
                },
        } => new_token(&name, &partners, admin),
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let config = Config::load(config.as_deref())?;
            println!("{}", toml::to_string_pretty(&config.redacted())?);
            Ok(())
        }
    }
}

/// A client for the gateway's API, sending the token when one is given.
fn api_client(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::try_from(format!("Bearer {token}"))
            .context("the token has characters a header cannot carry")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

async fn run_replay(client: &reqwest::Client, command: Command) -> anyhow::Result<()> {
    let Command::Replay {
        url,
        request_id,
        partner,
        since,
        until,
        state,
        limit,
    } = command
    else {
        anyhow::bail!("not a replay command");
    };
    let (path, body) = match (request_id, partner) {
        (Some(id), _) => (
            format!("/v1/notifications/{id}/replay"),
            serde_json::json!({}),
        ),
        (None, Some(partner)) => {
            let since_ms = parse_time(since.as_deref().unwrap_or_default())?;
            let until_ms = parse_time(until.as_deref().unwrap_or_default())?;
            let body = serde_json::json!({"partner_id": partner, "since_ms": since_ms,
                "until_ms": until_ms, "state": state, "limit": limit});
            ("/v1/replays".to_string(), body)
        }
        (None, None) => anyhow::bail!("give a request id or --partner"),
    };
    post_json(client, &url, &path, &body).await
}

async fn serve(
    file: Option<&Path>,
    listen: Option<SocketAddr>,
    roles: Roles,
) -> anyhow::Result<()> {
    let mut config = Config::load(file)?;
    if let Some(listen) = listen {
        config.api.listen = listen;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    server::run(config, roles, None, shutdown).await
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received; draining (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

async fn migrate(file: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    println!(
        "migrations applied to {}",
        crate::config::redact_url(config.database.url.expose())
    );
    Ok(())
}

async fn send(client: &reqwest::Client, url: &str, file: &Path) -> anyhow::Result<()> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let endpoint = format!("{}/v1/notifications", url.trim_end_matches('/'));
    let mut failed = 0;
    for (number, line) in notification_documents(&text) {
        let response = client
            .post(&endpoint)
            .header("content-type", "application/json")
            .body(line.to_string())
            .send()
            .await
            .with_context(|| format!("posting to {endpoint}"))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        println!("{}:{number}: {status} {body}", file.display());
        if !status.is_success() {
            failed += 1;
        }
    }
    anyhow::ensure!(failed == 0, "{failed} notification(s) were not accepted");
    Ok(())
}

/// A whole-file JSON object, or one document per non-empty line (JSON lines), with line numbers.
fn notification_documents(text: &str) -> Vec<(usize, &str)> {
    let trimmed = text.trim();
    if serde_json::from_str::<serde_json::Value>(trimmed).is_ok() {
        return vec![(1, trimmed)];
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l))
        .collect()
}

fn new_token(name: &str, partners: &[String], admin: bool) -> anyhow::Result<()> {
    use base64::Engine;
    use rand::RngCore;
    anyhow::ensure!(
        admin || !partners.is_empty(),
        "give --partner (repeatable) or --admin"
    );
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!(
        "ant_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let entry = crate::config::TokenConfig {
        name: name.to_string(),
        sha256: crate::api::auth::hash_token(&token),
        partners: partners.to_vec(),
        admin,
    };
    println!("token: {token}\n(give it to the caller; only its hash below is configured)\n");
    println!("[[api.tokens]]\n{}", toml::to_string(&entry)?);
    Ok(())
}

/// RFC 3339 time or milliseconds since the epoch.
fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let at = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("{text:?} is neither an RFC 3339 time nor milliseconds"))?;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    Ok(i64::try_from(ms)?)
}

async fn post_json(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    let endpoint = format!("{}{path}", url.trim_end_matches('/'));
    let response = client
        .post(&endpoint)
        .json(body)
        .send()
        .await
        .with_context(|| format!("posting to {endpoint}"))?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.context("the answer is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    anyhow::ensure!(status.is_success(), "the gateway answered {status}");
    Ok(())
}

async fn status(client: &reqwest::Client, url: &str, request_id: &str) -> anyhow::Result<()> {
    let endpoint = format!(
        "{}/v1/notifications/{request_id}",
        url.trim_end_matches('/')
    );
    let response = client
        .get(&endpoint)
        .send()
        .await
        .with_context(|| format!("asking {endpoint}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("the answer is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    anyhow::ensure!(status.is_success(), "the gateway answered {status}");
    Ok(())
}
