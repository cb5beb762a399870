//! Operator documents that must follow the code: the OpenAPI copy, the configuration and metrics
//! references, the container files.

use std::path::{Path, PathBuf};

use api_notify::config::Config;
use api_notify::metrics::Metrics;

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative))
        .unwrap_or_else(|e| panic!("{relative} should be readable: {e}"))
}

#[test]
fn committed_openapi_document_matches_the_code() {
    let generated = api_notify::api::openapi_json();
    if std::env::var_os("API_NOTIFY_BLESS").is_some() {
        std::fs::write(repo_file("docs/openapi.json"), &generated)
            .expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(repo_file("docs/openapi.json")).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the document the code generates; regenerate it with \
         `API_NOTIFY_BLESS=1 cargo test --test it committed_openapi_document` and commit it"
    );
}

#[test]
fn openapi_document_describes_every_route() {
    let doc: serde_json::Value = serde_json::from_str(&api_notify::api::openapi_json()).unwrap();
    for path in [
        "/v1/notifications",
        "/v1/notifications/{request_id}",
        "/v1/notifications/{request_id}/replay",
        "/v1/replays",
        "/v1/partners/{partner_id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "the OpenAPI document should describe {path}"
        );
    }
}

/// `section.key` for every leaf of the default configuration, plus the `[kafka]` keys.
fn config_keys() -> Vec<String> {
    let config = Config {
        kafka: Some(Default::default()),
        ..Config::default()
    };
    let tree = toml::Value::try_from(&config).expect("config as TOML");
    let mut keys = Vec::new();
    for (section, table) in tree.as_table().expect("top-level table") {
        for key in table.as_table().expect("section table").keys() {
            keys.push(format!("{section}.{key}"));
        }
    }
    keys
}

#[test]
fn configuration_reference_documents_every_key() {
    let reference = read("docs/configuration.md");
    let example = read("examples/config.toml");
    for key in config_keys() {
        assert!(
            reference.contains(&format!("`{key}`")),
            "docs/configuration.md should document `{key}`"
        );
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            example.contains(&format!("{leaf} =")) || example.contains(&format!("[{key}]")),
            "examples/config.toml should show {key}"
        );
    }
}

#[test]
fn metrics_reference_lists_every_exported_metric() {
    let reference = read("docs/metrics.md");
    let names = Metrics::new().names();
    assert!(names.len() >= 10, "every metric should be named: {names:?}");
    for name in names {
        assert!(
            reference.contains(&format!("`{name}`")),
            "docs/metrics.md should describe `{name}`"
        );
    }
}

#[test]
fn compose_file_parses_and_runs_the_whole_stack() {
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&read("examples/compose.yaml")).expect("compose.yaml is valid YAML");
    let services = compose["services"]
        .as_mapping()
        .expect("compose.yaml has a services mapping");
    for name in ["kafka", "mysql", "gateway", "receiver"] {
        assert!(
            services.contains_key(name),
            "compose.yaml should run a `{name}` service"
        );
    }
    let kafka_env = serde_yaml::to_string(&compose["services"]["kafka"]["environment"]).unwrap();
    assert!(
        kafka_env.contains("KAFKA_PROCESS_ROLES"),
        "the Kafka service should run in KRaft mode (process roles set): {kafka_env}"
    );
    assert!(
        compose["services"]["mysql"]["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("mysql:8")),
        "the database service should be MySQL 8"
    );
}

#[test]
fn dockerfile_runs_the_binary_as_a_non_root_user() {
    let dockerfile = read("Dockerfile");
    let last = |instruction: &str| {
        dockerfile
            .lines()
            .rfind(|l| l.trim_start().starts_with(instruction))
            .unwrap_or_else(|| panic!("the Dockerfile should have a {instruction} line"))
            .to_string()
    };
    let entrypoint = last("ENTRYPOINT");
    assert!(
        entrypoint.contains("\"/usr/local/bin/api-notify\""),
        "the image's entrypoint should be the api-notify binary: {entrypoint}"
    );
    let user = last("USER");
    assert!(
        !user.contains("root") && !user.trim_end().ends_with(" 0"),
        "the runtime image should not run as root: {user}"
    );
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "the Dockerfile should be multi-stage");
}

#[test]
fn compose_gateway_environment_is_a_valid_configuration() {
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&read("examples/compose.yaml")).expect("compose.yaml is valid YAML");
    let environment = compose["services"]["gateway"]["environment"]
        .as_mapping()
        .expect("the gateway service has an environment mapping");
    let mut check = std::process::Command::new(env!("CARGO_BIN_EXE_api-notify"));
    check.args(["config", "check"]);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("API_NOTIFY__")) {
        check.env_remove(name);
    }
    for (name, value) in environment {
        let (Some(name), Some(value)) = (name.as_str(), value.as_str()) else {
            panic!("environment entries should be strings: {name:?} = {value:?}");
        };
        check.env(name, value);
    }
    let out = check.output().expect("run api-notify config check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the compose gateway's environment should pass config check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[kafka]") && stdout.contains("[[api.tokens]]"),
        "the compose gateway should run in Kafka mode with a token: {stdout}"
    );
    assert!(
        !stdout.contains("compose-demo-only"),
        "config check should redact the compose database password: {stdout}"
    );
}
