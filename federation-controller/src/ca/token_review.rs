//! Kubernetes-mode proof of identity, as istiod does it: the caller's service-account token
//! is sent in a `TokenReview` to the API server of the caller's cluster, and an
//! authenticated `system:serviceaccount:NS:SA` proves `spiffe://<trust domain>/ns/NS/sa/SA`.
//!
//! The review asks for our audiences (Istio's `istio-ca`) and the answer must name one of
//! them: an authenticator that is not audience-aware would otherwise accept a token minted
//! for some other service, which could then be replayed to us.

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use mesh_vocab::ClusterId;
use mesh_vocab::spiffe::SpiffeId;

use super::review_cache::{DEFAULT_TTL, ReviewCache};
use crate::cluster_clients::ClusterClients;

/// Istio's default token audience (`TOKEN_AUDIENCES`).
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// How long a review may take before the caller is told to come back later.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token review did not prove an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewRefusal {
    #[error("cluster {0:?} is not one this CA reviews tokens for")]
    UnknownCluster(String),
    #[error("the API server of cluster {cluster} did not authenticate the token: {message}")]
    Denied { cluster: ClusterId, message: String },
    #[error("could not review the token with the API server of cluster {cluster}: {message}")]
    Failed { cluster: ClusterId, message: String },
    #[error("the token belongs to {0:?}, not to a service account")]
    NotAServiceAccount(String),
    #[error("the token is not for this CA's audiences {wanted:?} (the review answered {got:?})")]
    WrongAudience { wanted: Vec<String>, got: Vec<String> },
}

impl ReviewRefusal {
    /// The metric label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownCluster(_) => "unknown_cluster",
            Self::Denied { .. } => "token_review_denied",
            Self::Failed { .. } => "token_review_failed",
            Self::NotAServiceAccount(_) => "not_a_service_account",
            Self::WrongAudience { .. } => "wrong_audience",
        }
    }

    /// Whether the same request may succeed later: only when we could not ask. Every other
    /// refusal is an answer about the token, which asking again does not change.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }
}

/// Reviews service-account tokens with the API servers of the clusters we read.
pub struct TokenReviewer {
    /// Current as remote secrets come and go: a remote cluster's pods are reviewed by
    /// their own API server from the moment its secret is read.
    clusters: ClusterClients,
    /// Whose API server reviews a caller that names no cluster (istiod: its own cluster).
    home: ClusterId,
    audiences: Vec<String>,
    trust_domain: String,
    timeout: Duration,
    cache: ReviewCache,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("clusters", &self.clusters)
            .field("home", &self.home)
            .field("audiences", &self.audiences)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reviews with `clusters`' API servers; `home` must be one of them.
    pub fn new(
        clusters: ClusterClients,
        home: ClusterId,
        audiences: Vec<String>,
        trust_domain: &str,
        timeout: Duration,
    ) -> Self {
        Self {
            clusters,
            home,
            audiences,
            trust_domain: trust_domain.to_owned(),
            timeout,
            cache: ReviewCache::new(DEFAULT_TTL),
        }
    }

    /// The identity `token` proves in `cluster` (`None`: the home cluster).
    pub async fn review(&self, token: &str, cluster: Option<&str>) -> Result<SpiffeId, ReviewRefusal> {
        let cluster = match cluster {
            None | Some("") => self.home.clone(),
            Some(c) => ClusterId::new(c),
        };
        let client = self
            .clusters
            .get(&cluster)
            .ok_or_else(|| ReviewRefusal::UnknownCluster(cluster.to_string()))?;
        // A cached answer stands only while the cluster is still one we read (checked
        // above): a removed remote secret ends the trust in its tokens at once.
        if let Some(id) = self.cache.get(cluster.as_str(), token, Instant::now()) {
            return Ok(id);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let failed = |message: String| ReviewRefusal::Failed {
            cluster: cluster.clone(),
            message,
        };
        let api = Api::<TokenReview>::all(client);
        let answer = tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| failed(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| failed(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        let id = identity(&status, &self.audiences, &self.trust_domain).map_err(|e| match e {
            Judgement::Denied(message) => ReviewRefusal::Denied {
                cluster: cluster.clone(),
                message,
            },
            Judgement::Refused(r) => r,
        })?;
        self.cache
            .insert(cluster.as_str(), token, id.clone(), Instant::now(), SystemTime::now());
        Ok(id)
    }
}

/// A review's verdict against us, before it is tied to a cluster.
#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    Denied(String),
    Refused(ReviewRefusal),
}

/// What an API server's answer proves, if anything.
fn identity(status: &TokenReviewStatus, audiences: &[String], trust_domain: &str) -> Result<SpiffeId, Judgement> {
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(Judgement::Denied(error.to_owned()));
    }
    if status.authenticated != Some(true) {
        return Err(Judgement::Denied("not authenticated".into()));
    }
    // An empty list means "valid for the API server's own audience", which is not ours.
    let got = status.audiences.clone().unwrap_or_default();
    if !got.iter().any(|a| audiences.contains(a)) {
        return Err(Judgement::Refused(ReviewRefusal::WrongAudience {
            wanted: audiences.to_vec(),
            got,
        }));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let not_sa = || Judgement::Refused(ReviewRefusal::NotAServiceAccount(username.to_owned()));
    let (ns, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| kubernetes_name(ns) && kubernetes_name(sa))
        .ok_or_else(not_sa)?;
    SpiffeId::workload(trust_domain, ns, sa).map_err(|_| not_sa())
}

/// Whether `s` can be a namespace or service-account name (a DNS subdomain). Anything else
/// in a username, a `/` above all, would write a different path into the SPIFFE ID.
fn kubernetes_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, username: &str, audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some(username.into()),
                ..Default::default()
            }),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: None,
        }
    }

    fn ours() -> Vec<String> {
        vec![ISTIO_CA_AUDIENCE.to_owned()]
    }

    #[test]
    fn a_service_account_proves_its_spiffe_id() {
        let s = status(true, "system:serviceaccount:default:reviews", &["istio-ca"]);
        assert_eq!(
            identity(&s, &ours(), "cluster.local").unwrap().as_str(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
        let other_td = identity(&s, &ours(), "mesh.example").unwrap();
        assert_eq!(other_td.as_str(), "spiffe://mesh.example/ns/default/sa/reviews");
    }

    #[test]
    fn what_is_not_an_authenticated_service_account_for_us_proves_nothing() {
        let reason = |s: &TokenReviewStatus| match identity(s, &ours(), "cluster.local") {
            Ok(id) => panic!("accepted as {id}"),
            Err(Judgement::Denied(_)) => "token_review_denied",
            Err(Judgement::Refused(r)) => r.reason(),
        };
        assert_eq!(reason(&status(false, "", &[])), "token_review_denied");
        let mut with_error = status(true, "system:serviceaccount:default:reviews", &["istio-ca"]);
        with_error.error = Some("token has expired".into());
        assert_eq!(reason(&with_error), "token_review_denied");
        assert_eq!(reason(&TokenReviewStatus::default()), "token_review_denied");
        for user in [
            "alice",
            "system:node:worker-1",
            "system:serviceaccount:default",
            "system:serviceaccount::reviews",
            "system:serviceaccount:default:",
            "system:serviceaccount:default:a:b",
            "system:serviceaccount:default:bad/name",
            "system:serviceaccount:default:x/sa/admin",
            "system:serviceaccount:Default:reviews",
        ] {
            assert_eq!(
                reason(&status(true, user, &["istio-ca"])),
                "not_a_service_account",
                "{user}"
            );
        }
        let sa = "system:serviceaccount:default:reviews";
        assert_eq!(reason(&status(true, sa, &["other"])), "wrong_audience");
        assert_eq!(
            reason(&status(true, sa, &[])),
            "wrong_audience",
            "audience-unaware answer"
        );
        let mut none = status(true, sa, &[]);
        none.audiences = None;
        assert_eq!(reason(&none), "wrong_audience");
    }

    #[test]
    fn only_a_failure_to_ask_is_worth_retrying() {
        let c = ClusterId::new("c1");
        assert!(
            ReviewRefusal::Failed {
                cluster: c.clone(),
                message: String::new()
            }
            .retryable()
        );
        assert!(
            !ReviewRefusal::Denied {
                cluster: c,
                message: String::new()
            }
            .retryable()
        );
        assert!(!ReviewRefusal::UnknownCluster("x".into()).retryable());
    }
}
