//! Start-up rules that serde cannot express. Each problem names the key, the rule, and the value
//! found (never a secret's value), so an operator can fix the file without reading code.
//! `docs/configuration.md` states the same rules; change both together.

use super::Config;

/// Every rule the configuration breaks, one line each; empty when valid.
pub(super) fn problems(config: &Config) -> Vec<String> {
    let mut rules = Rules::default();
    api_and_database(config, &mut rules);
    kafka(config, &mut rules);
    delivery(config, &mut rules);
    partners(config, &mut rules);
    rules.at_least(
        "metrics.refresh_interval_ms",
        config.metrics.refresh_interval_ms,
        100,
    );
    rules.0
}

#[derive(Default)]
struct Rules(Vec<String>);

impl Rules {
    fn check(&mut self, ok: bool, key: &str, rule: impl FnOnce() -> String) {
        if !ok {
            self.0.push(format!("`{key}` {}", rule()));
        }
    }

    fn at_least(&mut self, key: &str, value: u64, min: u64) {
        self.check(value >= min, key, || {
            format!("must be at least {min} (got {value})")
        });
    }

    fn not_empty(&mut self, key: &str, value: &str) {
        self.check(!value.trim().is_empty(), key, || "must not be empty".into());
    }
}

fn api_and_database(config: &Config, rules: &mut Rules) {
    let api = &config.api;
    rules.at_least("api.max_request_bytes", api.max_request_bytes as u64, 1024);
    rules.at_least("api.queue_timeout_ms", api.queue_timeout_ms, 1);

    for (i, token) in api.tokens.iter().enumerate() {
        let key = format!("api.tokens[{i}]");
        let hex = token.sha256.len() == 64 && token.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        rules.check(hex, &format!("{key}.sha256"), || {
            "must be 64 hex digits, the SHA-256 of the token (api-notify token new)".into()
        });
        rules.check(token.admin || !token.partners.is_empty(), &key, || {
            format!("({}) must allow a partner or be admin", token.name)
        });
    }
    rules.check(
        !api.tokens.is_empty() || api.listen.ip().is_loopback(),
        "api.tokens",
        || {
            format!(
                "must not be empty when api.listen ({}) is not a loopback address, or anyone \
                 could call the API: add tokens (api-notify token new) or listen on loopback",
                api.listen
            )
        },
    );

    let url = config.database.url.expose();
    let known = ["sqlite:", "mysql:", "mariadb:"];
    rules.check(
        known.iter().any(|scheme| url.starts_with(scheme)),
        "database.url",
        || "must start with sqlite:// or mysql:// (value not shown: it may hold a password)".into(),
    );
    let pool = u64::from(config.database.max_connections);
    rules.at_least("database.max_connections", pool, 1);
}

fn kafka(config: &Config, rules: &mut Rules) {
    let Some(kafka) = &config.kafka else { return };
    rules.not_empty("kafka.brokers", &kafka.brokers);
    rules.not_empty("kafka.group", &kafka.group);
    let topic_ok = !kafka.topic.is_empty()
        && kafka.topic.len() <= 249
        && kafka
            .topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    rules.check(topic_ok, "kafka.topic", || {
        format!(
            "must be 1 to 249 characters of a-z, A-Z, 0-9, '.', '_', '-' (got {:?})",
            kafka.topic
        )
    });
    rules.at_least("kafka.intake_batch_max", kafka.intake_batch_max as u64, 1);
}

fn delivery(config: &Config, rules: &mut Rules) {
    let (o, d, r) = (&config.outbound, &config.dispatch, &config.retry);
    rules.at_least("outbound.connect_timeout_ms", o.connect_timeout_ms, 1);
    rules.at_least("outbound.request_timeout_ms", o.request_timeout_ms, 1);
    rules.check(
        r.schedule_secs.iter().all(|s| *s >= 1),
        "retry.schedule_secs",
        || format!("entries must be at least 1 (got {:?})", r.schedule_secs),
    );
    rules.check(r.jitter_percent <= 100, "retry.jitter_percent", || {
        format!("must be between 0 and 100 (got {})", r.jitter_percent)
    });
    rules.at_least("dispatch.max_in_flight", d.max_in_flight as u64, 1);
    rules.at_least("dispatch.claim_batch", d.claim_batch as u64, 1);
    rules.at_least("dispatch.poll_interval_ms", d.poll_interval_ms, 1);
    rules.at_least("dispatch.reap_interval_ms", d.reap_interval_ms, 1);
    let attempt_ms = o.request_timeout_ms.saturating_add(o.connect_timeout_ms);
    rules.check(
        d.lease_secs.saturating_mul(1000) > attempt_ms,
        "dispatch.lease_secs",
        || {
            format!(
                "must exceed outbound.connect_timeout_ms + outbound.request_timeout_ms \
                 ({attempt_ms} ms) so two workers never post the same row at once (got {} s)",
                d.lease_secs
            )
        },
    );
}

fn partners(config: &Config, rules: &mut Rules) {
    let defaults = &config.partner_defaults;
    rules.check(!defaults.fifo, "partner_defaults.fifo", || {
        "must be false: turn FIFO on per partner in [partners.<id>]".into()
    });
    let lease_ms = config.dispatch.lease_secs.saturating_mul(1000);
    let mut each = vec![("partner_defaults".to_string(), defaults.clone())];
    for id in config.partners.keys() {
        each.push((format!("partners.{id}"), config.partner(id)));
    }
    for (prefix, p) in each {
        rules.at_least(
            &format!("{prefix}.max_in_flight"),
            p.max_in_flight as u64,
            1,
        );
        rules.check(
            p.request_timeout_ms < lease_ms,
            &format!("{prefix}.request_timeout_ms"),
            || {
                format!(
                    "must be shorter than dispatch.lease_secs ({lease_ms} ms) (got {})",
                    p.request_timeout_ms
                )
            },
        );
        rules.check(
            p.retry_schedule_secs.iter().all(|s| *s >= 1),
            &format!("{prefix}.retry_schedule_secs"),
            || {
                format!(
                    "entries must be at least 1 (got {:?})",
                    p.retry_schedule_secs
                )
            },
        );
    }
    let retention = &config.retention;
    rules.at_least("retention.purge_batch", retention.purge_batch as u64, 1);
    rules.at_least(
        "retention.purge_interval_secs",
        retention.purge_interval_secs,
        1,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KafkaConfig, Secret};

    #[test]
    fn each_broken_rule_names_its_key_and_the_value_found() {
        let mut config = Config::default();
        config.dispatch.claim_batch = 0;
        config.retry.jitter_percent = 150;
        config.kafka = Some(KafkaConfig {
            topic: "bad topic".into(),
            ..KafkaConfig::default()
        });
        let problems = problems(&config);
        let expected = [
            "`dispatch.claim_batch` must be at least 1 (got 0)",
            "`retry.jitter_percent` must be between 0 and 100 (got 150)",
            "`kafka.topic` must be 1 to 249 characters",
        ];
        for line in expected {
            assert!(
                problems.iter().any(|p| p.starts_with(line)),
                "a problem starting with {line:?} should be reported: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 3, "only the broken rules are reported");
    }

    #[test]
    fn a_bad_database_url_is_reported_without_its_value() {
        let mut config = Config::default();
        config.database.url = Secret::new("postgres://u:hunter2@127.0.0.1/db");
        let problems = problems(&config).join("\n");
        assert!(
            problems.contains("`database.url`"),
            "the key should be named: {problems}"
        );
        assert!(
            !problems.contains("hunter2"),
            "the password must not be shown: {problems}"
        );
    }

    #[test]
    fn partner_override_rules_name_the_partner() {
        let mut config = Config::default();
        config.partners.insert(
            "acme".into(),
            crate::config::PartnerOverride {
                max_in_flight: Some(0),
                ..Default::default()
            },
        );
        let problems = problems(&config);
        assert_eq!(
            problems,
            vec!["`partners.acme.max_in_flight` must be at least 1 (got 0)".to_string()],
            "the partner's key should be named"
        );
    }

    #[test]
    fn lease_shorter_than_one_attempt_is_refused() {
        let mut config = Config::default();
        config.dispatch.lease_secs = 10;
        let problems = problems(&config);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("`dispatch.lease_secs` must exceed")),
            "a 10 s lease against a 35 s attempt should be refused: {problems:?}"
        );
    }
}
