//! Envoy's value matchers as RBAC uses them — `StringMatcher`, `HeaderMatcher` and
//! `CidrRange` — compiled once, so a check on the data path never parses or allocates a
//! regex.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher};
use regex::Regex;

use super::CompileError;

/// A compiled `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    /// RE2 syntax, matched against the whole value as Envoy's `safe_regex` is.
    Regex(Regex),
}

/// `ignore_case` folds ASCII only, as Envoy does.
fn fold(s: &str, ignore_case: bool) -> String {
    if ignore_case {
        s.to_ascii_lowercase()
    } else {
        s.to_owned()
    }
}

/// A regex that must match the whole value.
fn whole(r: &RegexMatcher) -> Result<Regex, CompileError> {
    Regex::new(&format!("^(?:{})$", r.regex)).map_err(|e| CompileError::Regex {
        regex: r.regex.clone(),
        problem: e.to_string(),
    })
}

impl StringMatch {
    /// Compiles `m`; a matcher without a pattern (or a custom one) cannot be honoured.
    pub fn compile(m: &StringMatcher) -> Result<Self, CompileError> {
        let ic = m.ignore_case;
        Ok(match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => Self::Exact(fold(s, ic), ic),
            Some(MatchPattern::Prefix(s)) => Self::Prefix(fold(s, ic), ic),
            Some(MatchPattern::Suffix(s)) => Self::Suffix(fold(s, ic), ic),
            Some(MatchPattern::Contains(s)) => Self::Contains(fold(s, ic), ic),
            Some(MatchPattern::SafeRegex(r)) => Self::Regex(whole(r)?),
            Some(MatchPattern::Custom(_)) => return Err(CompileError::Unsupported("custom string matcher")),
            None => return Err(CompileError::Unsupported("string matcher without a pattern")),
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let folded = |ic: bool| {
            if ic {
                std::borrow::Cow::Owned(value.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(value)
            }
        };
        match self {
            Self::Exact(s, ic) => *folded(*ic) == **s,
            Self::Prefix(s, ic) => folded(*ic).starts_with(s.as_str()),
            Self::Suffix(s, ic) => folded(*ic).ends_with(s.as_str()),
            Self::Contains(s, ic) => folded(*ic).contains(s.as_str()),
            Self::Regex(r) => r.is_match(value),
        }
    }
}

/// What a compiled `HeaderMatcher` tests a header's value with.
#[derive(Debug, Clone)]
enum ValueMatch {
    String(StringMatch),
    /// `present_match`: true matches any value, false matches only absence.
    Present(bool),
    /// `range_match`: the value as an integer in `[start, end)`.
    Range(i64, i64),
}

/// A compiled `envoy.config.route.v3.HeaderMatcher`; the value tested is every value of the
/// header joined by `,`, as Envoy does.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower case, as HTTP/2 and our header maps carry names; pseudo-headers keep the colon.
    pub name: String,
    value: ValueMatch,
    invert: bool,
    missing_as_empty: bool,
}

impl HeaderMatch {
    /// Compiles `m`, including the deprecated `exact_match`/`prefix_match`/… forms Istio
    /// still emits for older proxies.
    #[allow(deprecated)]
    pub fn compile(m: &HeaderMatcher) -> Result<Self, CompileError> {
        let value = match &m.header_match_specifier {
            Some(HeaderMatchSpecifier::StringMatch(s)) => ValueMatch::String(StringMatch::compile(s)?),
            Some(HeaderMatchSpecifier::ExactMatch(s)) => ValueMatch::String(StringMatch::Exact(s.clone(), false)),
            Some(HeaderMatchSpecifier::PrefixMatch(s)) => ValueMatch::String(StringMatch::Prefix(s.clone(), false)),
            Some(HeaderMatchSpecifier::SuffixMatch(s)) => ValueMatch::String(StringMatch::Suffix(s.clone(), false)),
            Some(HeaderMatchSpecifier::ContainsMatch(s)) => ValueMatch::String(StringMatch::Contains(s.clone(), false)),
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => ValueMatch::String(StringMatch::Regex(whole(r)?)),
            Some(HeaderMatchSpecifier::PresentMatch(p)) => ValueMatch::Present(*p),
            Some(HeaderMatchSpecifier::RangeMatch(r)) => ValueMatch::Range(r.start, r.end),
            // Envoy: a matcher with no specifier matches any present header.
            None => ValueMatch::Present(true),
        };
        Ok(Self {
            name: m.name.to_ascii_lowercase(),
            value,
            invert: m.invert_match,
            missing_as_empty: m.treat_missing_header_as_empty,
        })
    }

    /// Whether a header whose joined value is `value` (None: absent) matches. An absent
    /// header matches only `present_match: false`, before `invert_match` turns it around.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match value {
            Some(v) => v,
            None if self.missing_as_empty => "",
            None => return matches!(self.value, ValueMatch::Present(false)) != self.invert,
        };
        let matched = match &self.value {
            ValueMatch::String(s) => s.matches(value),
            ValueMatch::Present(p) => *p,
            ValueMatch::Range(start, end) => value.parse::<i64>().is_ok_and(|n| *start <= n && n < *end),
        };
        matched != self.invert
    }
}

/// A compiled `envoy.config.core.v3.CidrRange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Parses `address_prefix`/`prefix_len` (an unset length is 0, as in the proto).
    pub fn compile(c: &CidrRange) -> Result<Self, CompileError> {
        let bad = || CompileError::Cidr(format!("{}/{:?}", c.address_prefix, c.prefix_len.map(|l| l.value)));
        let network: IpAddr = c.address_prefix.parse().map_err(|_| bad())?;
        let len = c.prefix_len.map_or(0, |l| l.value);
        let max = if network.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(Self {
            network,
            prefix_len: len as u8,
        })
    }

    /// Whether `ip` is inside the range; an IPv4-mapped IPv6 address counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn sm(p: MatchPattern, ignore_case: bool) -> StringMatch {
        StringMatch::compile(&StringMatcher {
            ignore_case,
            match_pattern: Some(p),
        })
        .unwrap()
    }

    #[test]
    fn string_matchers_follow_envoy() {
        let cases = [
            (MatchPattern::Exact("GET".into()), false, "GET", true),
            (MatchPattern::Exact("GET".into()), false, "get", false),
            (MatchPattern::Exact("Reviews".into()), true, "REVIEWS", true),
            (MatchPattern::Prefix("/api".into()), false, "/api/v1", true),
            (MatchPattern::Prefix("/api".into()), false, "/ap", false),
            (
                MatchPattern::Suffix("/sa/admin".into()),
                false,
                "spiffe://a/ns/x/sa/admin",
                true,
            ),
            (
                MatchPattern::Contains("ns/prod".into()),
                false,
                "spiffe://a/ns/prod/sa/x",
                true,
            ),
            (
                MatchPattern::SafeRegex(RegexMatcher {
                    regex: ".*/ns/prod/.*".into(),
                    engine_type: None,
                }),
                false,
                "spiffe://a/ns/prod/sa/x",
                true,
            ),
            // safe_regex is a whole-value match, never a search.
            (
                MatchPattern::SafeRegex(RegexMatcher {
                    regex: "ns/prod".into(),
                    engine_type: None,
                }),
                false,
                "spiffe://a/ns/prod/sa/x",
                false,
            ),
        ];
        for (pattern, ic, value, want) in cases {
            assert_eq!(sm(pattern.clone(), ic).matches(value), want, "{pattern:?} on {value}");
        }
    }

    #[test]
    fn a_bad_regex_is_refused_with_its_text() {
        let e = StringMatch::compile(&StringMatcher {
            ignore_case: false,
            match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                regex: "(".into(),
                engine_type: None,
            })),
        })
        .unwrap_err();
        assert!(e.to_string().contains("\"(\""), "{e}");
    }

    fn header(spec: HeaderMatchSpecifier, invert: bool) -> HeaderMatch {
        HeaderMatch::compile(&HeaderMatcher {
            name: "X-Env".into(),
            invert_match: invert,
            treat_missing_header_as_empty: false,
            header_match_specifier: Some(spec),
        })
        .unwrap()
    }

    #[test]
    fn header_matchers_treat_absence_as_envoy_does() {
        let exact = HeaderMatchSpecifier::StringMatch(StringMatcher {
            ignore_case: false,
            match_pattern: Some(MatchPattern::Exact("prod".into())),
        });
        assert_eq!(header(exact.clone(), false).name, "x-env");
        assert!(header(exact.clone(), false).matches(Some("prod")));
        assert!(!header(exact.clone(), false).matches(None));
        assert!(header(exact.clone(), true).matches(None));
        assert!(!header(exact, true).matches(Some("prod")));
        assert!(header(HeaderMatchSpecifier::PresentMatch(true), false).matches(Some("")));
        assert!(!header(HeaderMatchSpecifier::PresentMatch(true), false).matches(None));
        assert!(header(HeaderMatchSpecifier::PresentMatch(false), false).matches(None));
        assert!(header(HeaderMatchSpecifier::PresentMatch(true), true).matches(None));
        let range =
            HeaderMatchSpecifier::RangeMatch(envoy_types::pb::envoy::r#type::v3::Int64Range { start: 1, end: 5 });
        assert!(header(range.clone(), false).matches(Some("4")));
        assert!(!header(range, false).matches(Some("5")));
    }

    fn cidr(prefix: &str, len: u32) -> Cidr {
        Cidr::compile(&CidrRange {
            address_prefix: prefix.into(),
            prefix_len: Some(UInt32Value { value: len }),
        })
        .unwrap()
    }

    #[test]
    fn cidr_ranges_contain_what_their_prefix_covers() {
        assert!(cidr("10.24.0.0", 16).contains("10.24.7.1".parse().unwrap()));
        assert!(!cidr("10.24.0.0", 16).contains("10.25.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0", 0).contains("192.0.2.1".parse().unwrap()));
        assert!(cidr("127.0.0.1", 32).contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(cidr("fd00::", 8).contains("fd12::1".parse().unwrap()));
        assert!(!cidr("fd00::", 8).contains("10.0.0.1".parse().unwrap()));
        assert!(
            Cidr::compile(&CidrRange {
                address_prefix: "10.0.0.0".into(),
                prefix_len: Some(UInt32Value { value: 33 }),
            })
            .is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn a_v4_range_contains_exactly_the_addresses_sharing_its_prefix(net: u32, ip: u32, len in 0u32..=32) {
            let c = cidr(&std::net::Ipv4Addr::from(net).to_string(), len);
            let shift = 32 - len;
            let same = shift == 32 || (net >> shift) == (ip >> shift);
            proptest::prop_assert_eq!(c.contains(IpAddr::V4(ip.into())), same);
        }
    }
}
