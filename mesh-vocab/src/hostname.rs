//! A service host name, such as `reviews.default.svc.cluster.local`.

use std::fmt;

/// A DNS host name naming a service, lowercased.
///
/// TLS server names and DNS are case-insensitive, so the name is normalised once
/// here and compared byte for byte everywhere else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(String);

/// Why a string is not a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("host name is empty")]
    Empty,
    #[error("host name is longer than 253 bytes")]
    TooLong,
    #[error("host name has an empty label")]
    EmptyLabel,
    #[error("host name label {0:?} is longer than 63 bytes")]
    LabelTooLong(String),
    #[error("host name label {0:?} may only hold letters, digits and '-', and may not start or end with '-'")]
    BadLabel(String),
}

impl Hostname {
    /// Validates `name` as an RFC 1123 host name (letters, digits, `-`; labels of
    /// 1–63 bytes; 253 bytes in all) and lowercases it.
    pub fn parse(name: &str) -> Result<Self, HostnameError> {
        if name.is_empty() {
            return Err(HostnameError::Empty);
        }
        if name.len() > 253 {
            return Err(HostnameError::TooLong);
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(HostnameError::EmptyLabel);
            }
            if label.len() > 63 {
                return Err(HostnameError::LabelTooLong(label.to_owned()));
            }
            let bytes = label.as_bytes();
            let ok = bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-';
            if !ok {
                return Err(HostnameError::BadLabel(label.to_owned()));
            }
        }
        Ok(Self(name.to_ascii_lowercase()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Kubernetes service name and namespace, when the host has the form
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub fn service_and_namespace(&self) -> Option<(&str, &str)> {
        let mut labels = self.0.split('.');
        let name = labels.next()?;
        let namespace = labels.next()?;
        (labels.next()? == "svc").then_some((name, namespace))
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Hostname {
    type Err = HostnameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercases_and_splits_service() {
        let h = Hostname::parse("Reviews.Default.svc.cluster.local").unwrap();
        assert_eq!(h.as_str(), "reviews.default.svc.cluster.local");
        assert_eq!(h.service_and_namespace(), Some(("reviews", "default")));
        assert_eq!(Hostname::parse("example.com").unwrap().service_and_namespace(), None);
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(Hostname::parse(""), Err(HostnameError::Empty));
        assert_eq!(Hostname::parse("a..b"), Err(HostnameError::EmptyLabel));
        assert_eq!(Hostname::parse("a."), Err(HostnameError::EmptyLabel));
        assert!(matches!(Hostname::parse("-a.b"), Err(HostnameError::BadLabel(_))));
        assert!(matches!(Hostname::parse("a_b.c"), Err(HostnameError::BadLabel(_))));
        assert!(matches!(
            Hostname::parse(&"x".repeat(64)),
            Err(HostnameError::LabelTooLong(_))
        ));
        let long = vec!["abcdefgh"; 30].join(".");
        assert_eq!(Hostname::parse(&long), Err(HostnameError::TooLong));
    }
}
