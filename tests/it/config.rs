//! The operator's contract for configuration and logs, exercised through the real binary: each
//! case runs `api-notify` as a child process with its own environment (the test process's
//! environment is never changed, since tests run in parallel threads).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use api_notify::config::{Config, redact_url};

const PASSWORD: &str = "s3cret-pa55word";

/// Runs `api-notify ARGS` with only `env` added to a clean `API_NOTIFY__` environment.
fn api_notify(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_api-notify"));
    cmd.args(args);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("API_NOTIFY__")) {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run the api-notify binary")
}

fn check(file: &Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = api_notify(
        &["config", "check", "--config", file.to_str().unwrap()],
        env,
    );
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).expect("write config file");
    path
}

#[test]
fn environment_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "[api]\nqueue_timeout_ms = 1111\nmax_request_bytes = 2222\n",
    );
    let env = [("API_NOTIFY__API__QUEUE_TIMEOUT_MS", "3333")];
    let (ok, stdout, stderr) = check(&file, &env);
    assert!(ok, "a valid configuration should pass the check: {stderr}");
    let effective: Config = toml::from_str(&stdout).expect("config check prints TOML");
    assert_eq!(
        effective.api.queue_timeout_ms, 3333,
        "the environment should win over the file"
    );
    assert_eq!(
        effective.api.max_request_bytes, 2222,
        "the file should win over the default"
    );
    assert_eq!(
        effective.dispatch.lease_secs,
        Config::default().dispatch.lease_secs,
        "a key set nowhere should keep its default"
    );
}

#[test]
fn unknown_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "[dispatch]\nmax_inflight = 10\n");
    let (ok, _, stderr) = check(&file, &[]);
    assert!(!ok, "an unknown key should fail the check");
    assert!(
        stderr.contains("max_inflight") && stderr.contains("dispatch"),
        "the error should name the unknown key dispatch.max_inflight: {stderr}"
    );

    let (ok, _, stderr) = check(&file_ok(&dir), &[("API_NOTIFY__OUTBOUND__TIMEOUT", "5")]);
    assert!(!ok, "an unknown key from the environment should fail too");
    assert!(
        stderr.contains("timeout") && stderr.contains("outbound"),
        "the error should name outbound.timeout: {stderr}"
    );
}

fn file_ok(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").unwrap();
    path
}

#[test]
fn bad_values_are_refused_with_the_key_and_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "[retry]\njitter_percent = 150\n[dispatch]\nclaim_batch = 0\n",
    );
    let (ok, _, stderr) = check(&file, &[]);
    assert!(!ok, "out-of-range values should fail the check");
    for expected in [
        "`retry.jitter_percent` must be between 0 and 100 (got 150)",
        "`dispatch.claim_batch` must be at least 1 (got 0)",
    ] {
        assert!(
            stderr.contains(expected),
            "stderr should say {expected:?}: {stderr}"
        );
    }

    let file = write(&dir, "[api]\nqueue_timeout_ms = \"soon\"\n");
    let (ok, _, stderr) = check(&file, &[]);
    assert!(!ok, "a string where a number belongs should fail the check");
    assert!(
        stderr.contains("api.queue_timeout_ms"),
        "the type error should name api.queue_timeout_ms: {stderr}"
    );
}

#[test]
fn database_password_never_appears_in_check_output_or_debug() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mysql://gateway:{PASSWORD}@127.0.0.1:3306/api_notify");
    let file = write(&dir, &format!("[database]\nurl = \"{url}\"\n"));
    let (ok, stdout, stderr) = check(&file, &[]);
    assert!(ok, "the configuration should be valid: {stderr}");
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "config check must not print the password: {stdout}{stderr}"
    );
    assert!(
        stdout.contains(&redact_url(&url)),
        "config check should show the URL with the password redacted: {stdout}"
    );

    // The same password from the environment, and in Debug of the loaded configuration.
    let (_, stdout, stderr) = check(&file_ok(&dir), &[("API_NOTIFY__DATABASE__URL", &url)]);
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "a password from the environment must not be printed either"
    );
    let loaded = Config::load(Some(&file)).expect("load the file");
    let debug = format!("{loaded:?} {:?}", loaded.database.url);
    assert!(
        !debug.contains(PASSWORD),
        "Debug of the configuration must not show the password: {debug}"
    );
}

#[test]
fn unreachable_database_error_does_not_print_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("mysql://gateway:{PASSWORD}@127.0.0.1:{port}/api_notify");
    let out = api_notify(
        &["migrate"],
        &[("API_NOTIFY__DATABASE__URL", &url), ("RUST_LOG", "debug")],
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "migrate against a closed port should fail"
    );
    assert!(
        all.contains("cannot connect") && !all.contains(PASSWORD),
        "the error should say it cannot connect without the password: {all}"
    );
}

#[test]
fn log_dir_receives_a_dated_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let db = format!("sqlite://{}", dir.path().join("gw.db").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_api-notify"))
        .args(["--log-format", "json", "--log-dir", logs.to_str().unwrap()])
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("API_NOTIFY__DATABASE__URL", &db)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while Instant::now() < deadline && !text.contains("API listening") {
        std::thread::sleep(Duration::from_millis(100));
        text = read_logs(&logs);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait for the gateway");
    assert!(
        status.success(),
        "the gateway should stop cleanly on SIGTERM"
    );
    let text = read_logs(&logs);
    let names: Vec<String> = std::fs::read_dir(&logs)
        .expect("the log directory exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("api-notify.log.")) && names.len() == 1,
        "one dated log file should be written: {names:?}"
    );
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or(""))
        .expect("log lines should be JSON with --log-format json");
    assert!(
        first.get("level").is_some() && text.contains("API listening"),
        "the file should hold the gateway's JSON log lines: {text}"
    );
}

fn read_logs(dir: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return String::new();
    };
    entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect()
}
