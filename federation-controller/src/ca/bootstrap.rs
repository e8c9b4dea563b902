//! Lab-mode proof of identity: a bootstrap token the CA itself minted for one SPIFFE ID,
//! handed to the workload out of band (the lab writes it into the workload's directory),
//! as a Kubernetes service-account token is in a real cluster.
//!
//! A token is `isthmus1.<expiry>.<hex HMAC-SHA256>.<SPIFFE ID>`, the MAC over
//! `isthmus1.<expiry>.<SPIFFE ID>` with a key that never leaves the CA's directory.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use mesh_vocab::spiffe::SpiffeId;

use super::store::{CaError, write_private};

/// Why a bootstrap token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("no bearer token in the request's authorization metadata")]
    Missing,
    #[error("the bearer token is not an Isthmus bootstrap token")]
    Malformed,
    #[error("the bearer token was not minted by this CA")]
    BadMac,
    #[error("the bearer token expired")]
    Expired,
}

impl TokenRefusal {
    /// The metric label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "no_credential",
            Self::Malformed => "malformed_credential",
            Self::BadMac => "bad_credential",
            Self::Expired => "expired_credential",
        }
    }
}

const PREFIX: &str = "isthmus1";
const KEY_FILE: &str = "bootstrap-key";

/// The key bootstrap tokens are minted and checked with.
pub struct BootstrapKey {
    key: hmac::Key,
}

impl std::fmt::Debug for BootstrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapKey(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl BootstrapKey {
    /// Whether `token` has the form of a bootstrap token (and so is checked as one, not sent
    /// to an API server for review).
    pub fn is_bootstrap_token(token: &str) -> bool {
        token
            .trim()
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.starts_with('.'))
    }

    /// Loads the key from the CA directory, making it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let path = dir.join(KEY_FILE);
        let bytes = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|source| CaError::Io {
                path: path.clone(),
                source,
            })?;
            unhex(text.trim())
                .filter(|b| b.len() == 32)
                .ok_or_else(|| CaError::Invalid {
                    path: path.clone(),
                    message: "expected 64 hex digits".into(),
                })?
        } else {
            let mut b = vec![0u8; 32];
            aws_lc_rs::rand::fill(&mut b).expect("the system RNG works");
            write_private(&path, format!("{}\n", hex(&b)).as_bytes(), 0o600)?;
            b
        };
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// Mints a token proving `id`, valid for `valid_for`.
    pub fn mint(&self, id: &SpiffeId, valid_for: Duration) -> String {
        let expiry = (SystemTime::now() + valid_for)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let tag = hmac::sign(&self.key, format!("{PREFIX}.{expiry}.{id}").as_bytes());
        format!("{PREFIX}.{expiry}.{}.{id}", hex(tag.as_ref()))
    }

    /// The identity `token` proves, if this CA minted it and it has not expired.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<SpiffeId, TokenRefusal> {
        let mut parts = token.trim().splitn(4, '.');
        let (Some(PREFIX), Some(expiry), Some(tag), Some(id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenRefusal::Malformed);
        };
        let tag = unhex(tag).ok_or(TokenRefusal::Malformed)?;
        hmac::verify(&self.key, format!("{PREFIX}.{expiry}.{id}").as_bytes(), &tag)
            .map_err(|_| TokenRefusal::BadMac)?;
        let expiry: u64 = expiry.parse().map_err(|_| TokenRefusal::Malformed)?;
        if now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) >= expiry {
            return Err(TokenRefusal::Expired);
        }
        SpiffeId::parse(id).map_err(|_| TokenRefusal::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_proves_its_identity_until_it_expires_and_only_with_its_key() {
        let dir = std::env::temp_dir().join(format!("isthmus-bootstrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = BootstrapKey::load_or_create(&dir).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
        let token = key.mint(&id, Duration::from_secs(3600));
        assert_eq!(key.verify(&token, SystemTime::now()), Ok(id.clone()));
        // The same key after a restart.
        let again = BootstrapKey::load_or_create(&dir).unwrap();
        assert_eq!(again.verify(&token, SystemTime::now()), Ok(id.clone()));
        assert_eq!(
            key.verify(&token, SystemTime::now() + Duration::from_secs(7200)),
            Err(TokenRefusal::Expired)
        );
        // Changing the identity breaks the MAC.
        let forged = token.replace("/sa/reviews", "/sa/admin");
        assert_eq!(key.verify(&forged, SystemTime::now()), Err(TokenRefusal::BadMac));
        assert_eq!(
            key.verify("Bearer nonsense", SystemTime::now()),
            Err(TokenRefusal::Malformed)
        );
        let other = std::env::temp_dir().join(format!("isthmus-bootstrap-other-{}", std::process::id()));
        std::fs::create_dir_all(&other).unwrap();
        let stranger = BootstrapKey::load_or_create(&other).unwrap();
        assert_eq!(stranger.verify(&token, SystemTime::now()), Err(TokenRefusal::BadMac));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other);
    }
}
