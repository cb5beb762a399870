//! Host-held signing keys and the per-partner view of them.
//!
//! Plugins name keys; only this module ever touches key bytes. The guest receives MACs and
//! signatures, never keys, and every error and `Debug` output here names keys without showing
//! them. Secrets are checked when the config is loaded (BR-03): a `whsec_` secret must be strict
//! base64 of at least 24 bytes, so a typo can never become a short or empty HMAC key.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ed25519_dalek::{Signer as _, SigningKey};
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};

use super::config::KeyConfig;

/// Shortest HMAC key accepted, in bytes (Standard Webhooks asks for 24 to 64).
pub const MIN_HMAC_KEY_BYTES: usize = 24;

/// Every key the host holds, parsed and checked.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, Arc<Key>>,
}

/// The keys one partner's plugin was granted.
#[derive(Clone, Default)]
pub struct Grant {
    keys: BTreeMap<String, Arc<Key>>,
}

// TODO: zeroize HMAC key bytes on drop (Ed25519 keys already are); needs the `zeroize` crate.
enum Key {
    Hmac(Vec<u8>),
    Ed25519(Box<SigningKey>),
}

/// Which MAC a caller wants.
#[derive(Debug, Clone, Copy)]
pub enum HmacAlgorithm {
    /// HMAC-SHA256, 32-byte MAC.
    Sha256,
    /// HMAC-SHA512, 64-byte MAC.
    Sha512,
}

/// Standard base64 with or without padding, but nothing else (no whitespace, no URL alphabet).
const STRICT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl KeyRing {
    /// Parses every configured key; the error names the first bad key, never its value.
    pub fn from_config(keys: &BTreeMap<String, KeyConfig>) -> anyhow::Result<Self> {
        let mut ring = Self::default();
        for (name, config) in keys {
            let key =
                Key::parse(config).map_err(|e| anyhow::anyhow!("plugins.keys.{name}: {e}"))?;
            ring.keys.insert(name.clone(), Arc::new(key));
        }
        Ok(ring)
    }

    /// The keys named in `names`; a name the host does not hold is an error.
    pub fn grant(&self, names: &[String]) -> anyhow::Result<Grant> {
        let mut grant = Grant::default();
        for name in names {
            let key = self.keys.get(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "key `{name}` is granted in plugin.toml but not configured in [plugins.keys]"
                )
            })?;
            grant.keys.insert(name.clone(), Arc::clone(key));
        }
        Ok(grant)
    }
}

impl Key {
    fn parse(config: &KeyConfig) -> Result<Self, String> {
        match (&config.hmac_secret, &config.ed25519_seed) {
            (Some(secret), None) => parse_hmac(secret.expose()).map(Key::Hmac),
            (None, Some(seed)) => parse_ed25519(seed.expose()).map(|k| Key::Ed25519(Box::new(k))),
            _ => Err("set exactly one of hmac_secret and ed25519_seed".to_owned()),
        }
    }
}

fn parse_hmac(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("hmac_secret must be `whsec_` followed by base64 of the key bytes")?;
    let key = STRICT_BASE64
        .decode(encoded)
        .map_err(|_| "hmac_secret after `whsec_` is not valid base64".to_owned())?;
    if key.len() < MIN_HMAC_KEY_BYTES {
        return Err(format!(
            "hmac_secret decodes to {} bytes; at least {MIN_HMAC_KEY_BYTES} are required",
            key.len()
        ));
    }
    Ok(key)
}

fn parse_ed25519(seed: &str) -> Result<SigningKey, String> {
    let bytes = STRICT_BASE64
        .decode(seed)
        .map_err(|_| "ed25519_seed is not valid base64".to_owned())?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "ed25519_seed must decode to exactly 32 bytes".to_owned())?;
    Ok(SigningKey::from_bytes(&seed))
}

impl Grant {
    /// HMAC of `data` with the granted key `name`.
    pub fn hmac(
        &self,
        algorithm: HmacAlgorithm,
        name: &str,
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        let Key::Hmac(secret) = self.key(name)? else {
            return Err(format!("key `{name}` is not an HMAC key"));
        };
        Ok(match algorithm {
            HmacAlgorithm::Sha256 => mac::<Hmac<Sha256>>(secret, data),
            HmacAlgorithm::Sha512 => mac::<Hmac<Sha512>>(secret, data),
        })
    }

    /// Ed25519 signature of `data` with the granted key `name`.
    pub fn ed25519_sign(&self, name: &str, data: &[u8]) -> Result<Vec<u8>, String> {
        let Key::Ed25519(key) = self.key(name)? else {
            return Err(format!("key `{name}` is not an Ed25519 key"));
        };
        Ok(key.sign(data).to_bytes().to_vec())
    }

    fn key(&self, name: &str) -> Result<&Key, String> {
        self.keys
            .get(name)
            .map(AsRef::as_ref)
            .ok_or_else(|| format!("key `{name}` is not granted to this partner"))
    }
}

fn mac<M: Mac + hmac::digest::KeyInit>(secret: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <M as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("names", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("names", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::Secret;
    use super::*;

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn hmac_config(secret: &str) -> BTreeMap<String, KeyConfig> {
        let key = KeyConfig {
            hmac_secret: Some(Secret::new(secret)),
            ed25519_seed: None,
        };
        BTreeMap::from([("k".to_owned(), key)])
    }

    #[test]
    fn whsec_secret_is_base64_decoded_before_use() {
        let ring = KeyRing::from_config(&hmac_config(SPEC_SECRET)).expect("spec secret is valid");
        let grant = ring.grant(&["k".to_owned()]).expect("k is configured");
        let data = b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{\"test\": 2432232314}";

        let mac = grant
            .hmac(HmacAlgorithm::Sha256, "k", data)
            .expect("k is granted");
        let encoded = base64::engine::general_purpose::STANDARD.encode(mac);
        assert_eq!(
            encoded, "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "spec vector should match"
        );
    }

    #[test]
    fn bad_or_short_secrets_are_rejected_at_load() {
        for secret in [
            "whsec_not base64!",
            "whsec_c2hvcnQ=",
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            let error = KeyRing::from_config(&hmac_config(secret)).err();
            let message = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.starts_with("plugins.keys.k:"),
                "secret {secret:?} should be refused by name"
            );
        }
    }

    #[test]
    fn errors_and_debug_never_show_key_bytes() {
        let ring = KeyRing::from_config(&hmac_config(SPEC_SECRET)).expect("spec secret is valid");
        let grant = ring.grant(&["k".to_owned()]).expect("k is configured");
        let wrong_kind = grant
            .ed25519_sign("k", b"x")
            .expect_err("k is not an Ed25519 key");

        let shown = format!("{ring:?} {grant:?} {wrong_kind}");
        assert!(
            !shown.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            "secret text leaked: {shown}"
        );
    }

    #[test]
    fn a_key_not_granted_is_refused() {
        let mut keys = hmac_config(SPEC_SECRET);
        keys.insert("other".to_owned(), keys["k"].clone());
        let ring = KeyRing::from_config(&keys).expect("keys are valid");
        let grant = ring.grant(&["k".to_owned()]).expect("k is configured");

        let refused = grant.hmac(HmacAlgorithm::Sha256, "other", b"x");
        assert!(
            refused.is_err(),
            "a key held by the host but not granted must not be usable"
        );
        assert!(
            ring.grant(&["missing".to_owned()]).is_err(),
            "granting an unknown key should fail"
        );
    }

    #[test]
    fn ed25519_seed_must_be_32_bytes() {
        let seed = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let good = KeyConfig {
            hmac_secret: None,
            ed25519_seed: Some(Secret::new(seed)),
        };
        let short = KeyConfig {
            hmac_secret: None,
            ed25519_seed: Some(Secret::new("AAAA")),
        };

        assert!(
            KeyRing::from_config(&BTreeMap::from([("e".to_owned(), good)])).is_ok(),
            "32-byte seed"
        );
        assert!(
            KeyRing::from_config(&BTreeMap::from([("e".to_owned(), short)])).is_err(),
            "3-byte seed"
        );
    }
}
