//! Request mirroring (Istio's `mirror` / `mirrorPercentage`): a copy of a share of the
//! requests goes to a shadow cluster, with `-shadow` appended to its authority's host as
//! Envoy does, so the shadow can tell copies from real traffic. Its answers are dropped.

use envoy_types::pb::envoy::config::route::v3::route_action::RequestMirrorPolicy;
use hyper::http::uri::Authority;

use super::Invalid;
use super::fraction::Fraction;

/// One mirror policy.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub cluster: String,
    pub fraction: Fraction,
}

impl Mirror {
    /// Compiles a `RequestMirrorPolicy` naming its cluster.
    pub fn compile(p: &RequestMirrorPolicy) -> Result<Self, Invalid> {
        if p.cluster.is_empty() {
            return Err(Invalid("a mirror policy needs a cluster".into()));
        }
        Ok(Self {
            cluster: p.cluster.clone(),
            fraction: Fraction::of(p.runtime_fraction.as_ref().and_then(|r| r.default_value.as_ref())),
        })
    }
}

/// `reviews:9080` → `reviews-shadow:9080`, as Envoy names a shadowed request's host.
pub fn shadow_authority(authority: &Authority) -> Authority {
    let shadowed = match authority.port() {
        Some(port) => format!("{}-shadow:{port}", authority.host()),
        None => format!("{}-shadow", authority.host()),
    };
    Authority::try_from(shadowed).unwrap_or_else(|_| authority.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_host_keeps_its_port() {
        let a = |s: &'static str| Authority::from_static(s);
        assert_eq!(shadow_authority(&a("reviews:9080")).as_str(), "reviews-shadow:9080");
        assert_eq!(shadow_authority(&a("reviews")).as_str(), "reviews-shadow");
        assert!(Mirror::compile(&RequestMirrorPolicy::default()).is_err());
    }
}
