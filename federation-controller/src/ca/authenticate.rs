//! Who is calling: the identity a caller of the CA proves with the credential in its
//! request's metadata, `authorization: Bearer <token>`.
//!
//! Two kinds of credential, told apart by their form: a lab bootstrap token this CA minted
//! (`isthmus1.…`, see [`super::bootstrap`]), or, in Kubernetes mode, a service-account
//! token reviewed by the API server of the cluster the caller names in `clusterid`
//! metadata (istio-agent sends its `CLUSTER_ID` there), see [`super::token_review`].

use std::time::SystemTime;

use mesh_vocab::spiffe::SpiffeId;
use tonic::metadata::MetadataMap;

use super::bootstrap::{BootstrapKey, TokenRefusal};
use super::token_review::{ReviewRefusal, TokenReviewer};

/// The metadata key istio-agent names its cluster in (Istio's `clusterIDMeta`).
pub const CLUSTER_ID_METADATA: &str = "clusterid";

/// A credential, classified by form before it is checked.
#[derive(Debug, PartialEq, Eq)]
enum Credential<'a> {
    /// One of our lab bootstrap tokens.
    Bootstrap(&'a str),
    /// Anything else: a Kubernetes service-account token, if it is one.
    ServiceAccountToken { token: &'a str, cluster: Option<&'a str> },
}

impl<'a> Credential<'a> {
    fn from_metadata(metadata: &'a MetadataMap) -> Result<Self, TokenRefusal> {
        let value = metadata.get("authorization").ok_or(TokenRefusal::Missing)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(TokenRefusal::Malformed)?;
        if BootstrapKey::is_bootstrap_token(token) {
            return Ok(Self::Bootstrap(token));
        }
        // istio-agent sends exactly one; several are ambiguous and treated as none named,
        // as istiod does.
        let mut clusters = metadata.get_all(CLUSTER_ID_METADATA).iter();
        let cluster = match (clusters.next(), clusters.next()) {
            (Some(c), None) => Some(c.to_str().map_err(|_| TokenRefusal::Malformed)?),
            _ => None,
        };
        Ok(Self::ServiceAccountToken { token, cluster })
    }
}

/// Why the caller's identity is not proven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    #[error(transparent)]
    Bootstrap(#[from] TokenRefusal),
    #[error(transparent)]
    Review(#[from] ReviewRefusal),
}

impl AuthRefusal {
    /// The metric label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Bootstrap(r) => r.reason(),
            Self::Review(r) => r.reason(),
        }
    }

    /// The gRPC status the caller gets: `UNAVAILABLE` when we could not check the
    /// credential (retry, maybe elsewhere), `UNAUTHENTICATED` when it was checked and
    /// proves nothing (retrying with it is pointless).
    pub fn status(&self) -> tonic::Status {
        match self {
            Self::Review(r) if r.retryable() => tonic::Status::unavailable(self.to_string()),
            _ => tonic::Status::unauthenticated(self.to_string()),
        }
    }
}

/// Proves callers' identities: always with bootstrap tokens, and with token reviews when
/// the controller reads Kubernetes clusters.
#[derive(Debug)]
pub struct Authenticator {
    bootstrap: BootstrapKey,
    token_review: Option<TokenReviewer>,
}

impl Authenticator {
    /// Accepts bootstrap tokens minted with `bootstrap` only (lab mode).
    pub fn new(bootstrap: BootstrapKey) -> Self {
        Self {
            bootstrap,
            token_review: None,
        }
    }

    /// Also accepts service-account tokens that `reviewer` vouches for (Kubernetes mode).
    pub fn with_token_review(mut self, reviewer: TokenReviewer) -> Self {
        self.token_review = Some(reviewer);
        self
    }

    /// The identity the caller proved with the credential in `metadata`.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<SpiffeId, AuthRefusal> {
        match Credential::from_metadata(metadata)? {
            Credential::Bootstrap(token) => Ok(self.bootstrap.verify(token, SystemTime::now())?),
            Credential::ServiceAccountToken { token, cluster } => match &self.token_review {
                Some(reviewer) => Ok(reviewer.review(token, cluster).await?),
                // Lab mode: nothing could vouch for it.
                None => Err(TokenRefusal::Malformed.into()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn credentials_are_told_apart_by_form() {
        let m = metadata(&[("authorization", "Bearer isthmus1.1.ab.spiffe://x/y")]);
        assert_eq!(
            Credential::from_metadata(&m),
            Ok(Credential::Bootstrap("isthmus1.1.ab.spiffe://x/y"))
        );
        let m = metadata(&[("authorization", "Bearer eyJhbGciOi.x.y"), ("clusterid", "c2")]);
        assert_eq!(
            Credential::from_metadata(&m),
            Ok(Credential::ServiceAccountToken {
                token: "eyJhbGciOi.x.y",
                cluster: Some("c2")
            })
        );
        let m = metadata(&[("authorization", "Bearer t"), ("clusterid", "c1"), ("clusterid", "c2")]);
        assert_eq!(
            Credential::from_metadata(&m),
            Ok(Credential::ServiceAccountToken {
                token: "t",
                cluster: None
            })
        );
        assert_eq!(Credential::from_metadata(&metadata(&[])), Err(TokenRefusal::Missing));
        for bad in ["Basic dXNlcjpwYXNz", "Bearer ", "t"] {
            let m = metadata(&[("authorization", bad)]);
            assert_eq!(Credential::from_metadata(&m), Err(TokenRefusal::Malformed), "{bad}");
        }
    }

    #[test]
    fn only_a_failure_to_check_asks_the_caller_to_retry() {
        let unavailable = AuthRefusal::from(ReviewRefusal::Failed {
            cluster: mesh_vocab::ClusterId::new("c1"),
            message: "connection refused".into(),
        });
        assert_eq!(unavailable.status().code(), tonic::Code::Unavailable);
        assert_eq!(unavailable.reason(), "token_review_failed");
        let denied = AuthRefusal::from(ReviewRefusal::UnknownCluster("c9".into()));
        assert_eq!(denied.status().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            AuthRefusal::from(TokenRefusal::BadMac).status().code(),
            tonic::Code::Unauthenticated
        );
    }
}
