//! Successful token reviews, remembered for a short while.
//!
//! Why: every sidecar asks for an SVID when it starts and again at half-life, and retries on
//! failure. After a node or control-plane restart hundreds of pods ask at once, and a pod
//! whose CSR failed for another reason retries with the same token. Without a cache each
//! of those is a TokenReview on the caller's API server, which that API server (shared by
//! the whole cluster) pays for. A short TTL bounds how long a token revoked in Kubernetes
//! (its pod or service account deleted) still proves its identity here; that is never past
//! the token's own expiry, when we can read it.
//!
//! Entries are keyed by a SHA-256 of the cluster and the token, never by the token itself:
//! a memory dump of the controller must not hand out credentials.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::digest;
use base64::Engine;
use mesh_vocab::spiffe::SpiffeId;

/// How long a successful review is trusted without asking again.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// Entries beyond this are not added: the cache is an optimisation, not a store, and must
/// not grow with a flood of distinct tokens.
const CAPACITY: usize = 8192;

/// Identities proven by recent reviews.
#[derive(Debug)]
pub struct ReviewCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], (SpiffeId, Instant)>>,
}

fn key(cluster: &str, token: &str) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(cluster.as_bytes());
    // A separator no cluster name holds, so ("a", "bc") and ("ab", "c") differ.
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl ReviewCache {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::default(),
        }
    }

    /// The identity `token` proved in `cluster`, if a review said so less than a TTL ago.
    pub fn get(&self, cluster: &str, token: &str, now: Instant) -> Option<SpiffeId> {
        let mut entries = self.entries.lock().expect("not poisoned");
        let k = key(cluster, token);
        match entries.get(&k) {
            Some((id, until)) if now < *until => Some(id.clone()),
            Some(_) => {
                entries.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Remembers that `token` proved `id` in `cluster`, until the TTL passes or the token
    /// expires, whichever comes first.
    pub fn insert(&self, cluster: &str, token: &str, id: SpiffeId, now: Instant, wall: SystemTime) {
        let mut life = self.ttl;
        if let Some(exp) = unverified_expiry(token) {
            life = life.min(exp.duration_since(wall).unwrap_or_default());
        }
        if life.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("not poisoned");
        if entries.len() >= CAPACITY {
            entries.retain(|_, (_, until)| now < *until);
            if entries.len() >= CAPACITY {
                return;
            }
        }
        entries.insert(key(cluster, token), (id, now + life));
    }
}

/// The `exp` claim of a JWT, read without checking its signature. Used only to forget a
/// review sooner, never to accept anything: a forged `exp` can only shorten a cache entry
/// of a token the API server has already accepted.
pub fn unverified_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (Some(_), Some(claims), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()?
        .get("exp")?
        .as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::workload("cluster.local", "default", sa).unwrap()
    }

    fn jwt(exp: u64) -> String {
        let enc = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2lnbmF0dXJl",
            enc(serde_json::json!({"alg": "RS256"})),
            enc(serde_json::json!({"sub": "system:serviceaccount:default:reviews", "exp": exp}))
        )
    }

    #[test]
    fn an_entry_lives_its_ttl_per_cluster_and_token() {
        let cache = ReviewCache::new(Duration::from_secs(60));
        let (t0, wall) = (Instant::now(), SystemTime::now());
        cache.insert("c1", "opaque-token", id("reviews"), t0, wall);
        assert_eq!(
            cache.get("c1", "opaque-token", t0 + Duration::from_secs(59)),
            Some(id("reviews"))
        );
        assert_eq!(cache.get("c2", "opaque-token", t0), None, "another cluster's review");
        assert_eq!(cache.get("c1", "other-token", t0), None);
        assert_eq!(cache.get("c1", "opaque-token", t0 + Duration::from_secs(60)), None);
        // Expired entries are dropped, not just hidden.
        assert!(cache.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn an_entry_never_outlives_the_tokens_own_expiry() {
        let cache = ReviewCache::new(Duration::from_secs(60));
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let now_unix = wall.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let soon = jwt(now_unix + 10);
        cache.insert("c1", &soon, id("reviews"), t0, wall);
        assert!(cache.get("c1", &soon, t0 + Duration::from_secs(5)).is_some());
        assert_eq!(cache.get("c1", &soon, t0 + Duration::from_secs(11)), None);
        let gone = jwt(now_unix - 10);
        cache.insert("c1", &gone, id("reviews"), t0, wall);
        assert_eq!(cache.get("c1", &gone, t0), None, "an expired token is not cached");
    }

    #[test]
    fn the_token_itself_is_not_kept() {
        let cache = ReviewCache::new(Duration::from_secs(60));
        let secret = "very-secret-token-value";
        cache.insert("c1", secret, id("reviews"), Instant::now(), SystemTime::now());
        let dump = format!("{:?}", cache);
        assert!(!dump.contains(secret), "{dump}");
    }

    #[test]
    fn expiry_is_read_only_from_a_well_formed_jwt() {
        assert_eq!(
            unverified_expiry(&jwt(1_900_000_000)),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
        assert_eq!(unverified_expiry("opaque"), None);
        assert_eq!(unverified_expiry("a.b.c.d"), None);
        assert_eq!(unverified_expiry("a.!!!.c"), None);
    }
}
