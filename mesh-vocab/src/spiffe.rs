//! SPIFFE IDs, as the SPIFFE-ID specification defines them.
//!
//! Workload identities in the mesh are `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID; `td_end` splits it into trust domain and path.
    id: String,
    td_end: usize,
}

/// Why a string is not a SPIFFE ID (SPIFFE-ID spec §2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    Scheme,
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
    #[error("SPIFFE ID trust domain is empty")]
    EmptyTrustDomain,
    #[error("SPIFFE ID trust domain may hold only lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomain,
    #[error("SPIFFE ID path has an empty segment or ends with '/'")]
    EmptySegment,
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    #[error("SPIFFE ID path may hold only letters, digits, '.', '-' and '_'")]
    BadPath,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if !td
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
        {
            return Err(SpiffeIdError::BadTrustDomain);
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                match seg {
                    "" => return Err(SpiffeIdError::EmptySegment),
                    "." | ".." => return Err(SpiffeIdError::DotSegment),
                    _ if !seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) =>
                    {
                        return Err(SpiffeIdError::BadPath);
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            id: s.to_owned(),
            td_end: "spiffe://".len() + td_len,
        })
    }

    /// The mesh's workload identity `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"))
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.td_end]
    }

    /// The path, starting with `/` (empty for a trust domain's own ID).
    pub fn path(&self) -> &str {
        &self.id[self.td_end..]
    }

    /// Namespace and service account, when the path is `/ns/<ns>/sa/<sa>`.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut segs = self.path().strip_prefix('/')?.split('/');
        match (segs.next(), segs.next(), segs.next(), segs.next(), segs.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/reviews");
        assert_eq!(id.namespace_and_service_account(), Some(("default", "reviews")));
        assert_eq!(SpiffeId::workload("cluster.local", "default", "reviews").unwrap(), id);
        let td = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!((td.trust_domain(), td.path()), ("example.org", ""));
        assert_eq!(td.namespace_and_service_account(), None);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        use SpiffeIdError::*;
        for (s, e) in [
            ("https://cluster.local/ns/a", Scheme),
            ("SPIFFE://cluster.local/ns/a", Scheme),
            ("spiffe:///ns/a", EmptyTrustDomain),
            ("spiffe://Cluster.local/ns/a", BadTrustDomain),
            ("spiffe://td:8080/ns/a", BadTrustDomain),
            ("spiffe://user@td/ns/a", BadTrustDomain),
            ("spiffe://td/ns//a", EmptySegment),
            ("spiffe://td/ns/a/", EmptySegment),
            ("spiffe://td/", EmptySegment),
            ("spiffe://td/ns/../a", DotSegment),
            ("spiffe://td/ns/a?x=1", BadPath),
            ("spiffe://td/ns/a#f", BadPath),
            ("spiffe://td/ns/%41", BadPath),
        ] {
            assert_eq!(SpiffeId::parse(s), Err(e), "{s}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2040));
        assert_eq!(SpiffeId::parse(&long), Err(TooLong));
    }
}
