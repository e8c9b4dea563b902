//! Which requests a route takes: Envoy's `RouteMatch` — the path (exact, prefix or a
//! whole-path regex, optionally case-insensitive), header matchers (pseudo-headers
//! `:method`, `:authority`, `:path`, `:scheme` included) and query-parameter matchers, all
//! of which must hold.

use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RouteMatch, header_matcher, query_parameter_matcher, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use hyper::http::request::Parts;
use regex::Regex;

use super::Invalid;

/// A compiled `RouteMatch`.
#[derive(Debug, Clone)]
pub struct Matcher {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
}

#[derive(Debug, Clone)]
enum PathMatch {
    /// Envoy compares a prefix with the whole `:path`, query included.
    Prefix(String),
    /// The path without its query.
    Exact(String),
    /// The path without its query, matched whole.
    Regex(Regex),
}

/// A compiled `StringMatcher`.
#[derive(Debug, Clone)]
pub struct StringMatch {
    pattern: Pattern,
    ignore_case: bool,
}

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
enum ValueMatch {
    String(StringMatch),
    /// `present_match`: whether the header is there at all.
    Present(bool),
}

/// A compiled `HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    name: String,
    value: ValueMatch,
    invert: bool,
    treat_missing_as_empty: bool,
}

#[derive(Debug, Clone)]
struct QueryMatch {
    name: String,
    value: ValueMatch,
}

/// RE2's whole-string semantics with the regex crate: anchored at both ends.
pub fn whole(regex: &RegexMatcher) -> Result<Regex, Invalid> {
    Regex::new(&format!("^(?:{})$", regex.regex)).map_err(|e| Invalid(format!("regex {:?}: {e}", regex.regex)))
}

impl StringMatch {
    /// Compiles a `StringMatcher`; `custom` extensions are refused.
    pub fn compile(m: &StringMatcher) -> Result<Self, Invalid> {
        let pattern = match &m.match_pattern {
            Some(string_matcher::MatchPattern::Exact(s)) => Pattern::Exact(s.clone()),
            Some(string_matcher::MatchPattern::Prefix(s)) => Pattern::Prefix(s.clone()),
            Some(string_matcher::MatchPattern::Suffix(s)) => Pattern::Suffix(s.clone()),
            Some(string_matcher::MatchPattern::Contains(s)) => Pattern::Contains(s.clone()),
            Some(string_matcher::MatchPattern::SafeRegex(r)) => Pattern::Regex(whole(r)?),
            Some(string_matcher::MatchPattern::Custom(_)) | None => {
                return Err(Invalid("string matcher without a supported pattern".into()));
            }
        };
        Ok(Self {
            pattern,
            ignore_case: m.ignore_case,
        })
    }

    /// Whether `value` matches; `ignore_case` does not apply to a regex, as in Envoy.
    pub fn matches(&self, value: &str) -> bool {
        let folded = |s: &str| {
            if self.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        let v = folded(value);
        match &self.pattern {
            Pattern::Exact(s) => v == folded(s),
            Pattern::Prefix(s) => v.starts_with(&folded(s)),
            Pattern::Suffix(s) => v.ends_with(&folded(s)),
            Pattern::Contains(s) => v.contains(&folded(s)),
            Pattern::Regex(r) => r.is_match(value),
        }
    }
}

impl ValueMatch {
    /// Envoy's rule for a value that may be missing.
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (ValueMatch::String(m), Some(v)) => m.matches(v),
            (ValueMatch::String(_), None) => false,
        }
    }
}

#[allow(deprecated)] // the deprecated specifiers are still what older control planes send
fn header_value_match(h: &HeaderMatcher) -> Result<ValueMatch, Invalid> {
    use header_matcher::HeaderMatchSpecifier as S;
    let string = |pattern| StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    };
    let m = match &h.header_match_specifier {
        Some(S::StringMatch(m)) => m.clone(),
        Some(S::ExactMatch(s)) => string(string_matcher::MatchPattern::Exact(s.clone())),
        Some(S::PrefixMatch(s)) => string(string_matcher::MatchPattern::Prefix(s.clone())),
        Some(S::SuffixMatch(s)) => string(string_matcher::MatchPattern::Suffix(s.clone())),
        Some(S::ContainsMatch(s)) => string(string_matcher::MatchPattern::Contains(s.clone())),
        Some(S::SafeRegexMatch(r)) => string(string_matcher::MatchPattern::SafeRegex(r.clone())),
        Some(S::PresentMatch(p)) => return Ok(ValueMatch::Present(*p)),
        // No specifier: Envoy takes it as "present".
        None => return Ok(ValueMatch::Present(true)),
        Some(S::RangeMatch(_)) => return Err(Invalid(format!("header {:?}: range match is not supported", h.name))),
    };
    Ok(ValueMatch::String(StringMatch::compile(&m)?))
}

impl HeaderMatch {
    /// Compiles a `HeaderMatcher`.
    pub fn compile(h: &HeaderMatcher) -> Result<Self, Invalid> {
        Ok(Self {
            name: h.name.to_ascii_lowercase(),
            value: header_value_match(h)?,
            invert: h.invert_match,
            treat_missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    /// Envoy's `HeaderUtility::matchHeaders`: a missing header matches only a matcher that
    /// asks for its absence, or an inverted matcher that is not a presence check.
    pub fn matches(&self, req: &Parts) -> bool {
        let value = header_value(req, &self.name);
        let value = match value {
            None if self.treat_missing_as_empty => Some(String::new()),
            v => v,
        };
        match value {
            None if self.invert => !matches!(self.value, ValueMatch::Present(_)),
            None => matches!(self.value, ValueMatch::Present(false)),
            Some(v) => self.value.matches(Some(&v)) != self.invert,
        }
    }
}

impl HeaderMatch {
    /// Whether it is a matcher on the request's method.
    pub fn names_method(&self) -> bool {
        self.name == ":method"
    }
}

/// A header as Envoy's matchers see it: pseudo-headers from the request line, several
/// values of one header joined with `,`.
pub fn header_value(req: &Parts, name: &str) -> Option<String> {
    match name {
        ":method" => Some(req.method.as_str().to_owned()),
        ":authority" => req
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| req.headers.get(hyper::header::HOST)?.to_str().ok().map(str::to_owned)),
        ":path" => Some(req.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned()),
        ":scheme" => Some(req.uri.scheme_str().unwrap_or("http").to_owned()),
        _ => {
            let values: Vec<&str> = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        }
    }
}

/// The value of query parameter `name` (the first one), `""` for a bare `?name`.
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl QueryMatch {
    fn compile(q: &QueryParameterMatcher) -> Result<Self, Invalid> {
        use query_parameter_matcher::QueryParameterMatchSpecifier as S;
        let value = match &q.query_parameter_match_specifier {
            Some(S::StringMatch(m)) => ValueMatch::String(StringMatch::compile(m)?),
            Some(S::PresentMatch(p)) => ValueMatch::Present(*p),
            None => ValueMatch::Present(true),
        };
        Ok(Self {
            name: q.name.clone(),
            value,
        })
    }
}

impl Matcher {
    /// Compiles a `RouteMatch`.
    pub fn compile(m: &RouteMatch) -> Result<Self, Invalid> {
        use route_match::PathSpecifier as P;
        let path = match &m.path_specifier {
            Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
            Some(P::Path(p)) => PathMatch::Exact(p.clone()),
            Some(P::SafeRegex(r)) => PathMatch::Regex(whole(r)?),
            Some(P::PathSeparatedPrefix(_) | P::ConnectMatcher(_) | P::PathMatchPolicy(_)) | None => {
                return Err(Invalid("a route match needs prefix, path or safe_regex".into()));
            }
        };
        Ok(Self {
            path,
            case_sensitive: m.case_sensitive.is_none_or(|c| c.value),
            headers: m.headers.iter().map(HeaderMatch::compile).collect::<Result<_, _>>()?,
            query: m
                .query_parameters
                .iter()
                .map(QueryMatch::compile)
                .collect::<Result<_, _>>()?,
        })
    }

    /// What `prefix_rewrite` replaces: the matched prefix, or the whole exact path.
    pub fn literal(&self) -> Option<&str> {
        match &self.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => Some(p),
            PathMatch::Regex(_) => None,
        }
    }

    /// Whether the request is this route's.
    pub fn matches(&self, req: &Parts) -> bool {
        let full = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let path = req.uri.path();
        let fold = |a: &str, b: &str| -> (String, String) {
            if self.case_sensitive {
                (a.to_owned(), b.to_owned())
            } else {
                (a.to_ascii_lowercase(), b.to_ascii_lowercase())
            }
        };
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => {
                let (have, want) = fold(full, p);
                have.starts_with(&want)
            }
            PathMatch::Exact(p) => {
                let (have, want) = fold(path, p);
                have == want
            }
            PathMatch::Regex(r) => r.is_match(path),
        };
        let query = req.uri.query().unwrap_or("");
        path_ok
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| q.value.matches(query_param(query, &q.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::BoolValue;
    use hyper::Request;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn string(p: string_matcher::MatchPattern) -> StringMatcher {
        StringMatcher {
            match_pattern: Some(p),
            ignore_case: false,
        }
    }

    fn header(name: &str, spec: header_matcher::HeaderMatchSpecifier, invert: bool) -> HeaderMatcher {
        HeaderMatcher {
            name: name.into(),
            invert_match: invert,
            header_match_specifier: Some(spec),
            ..Default::default()
        }
    }

    fn regex(r: &str) -> RegexMatcher {
        RegexMatcher {
            regex: r.into(),
            ..Default::default()
        }
    }

    fn on_path(p: route_match::PathSpecifier) -> RouteMatch {
        RouteMatch {
            path_specifier: Some(p),
            ..Default::default()
        }
    }

    #[test]
    fn paths_exact_prefix_and_whole_regex() {
        use route_match::PathSpecifier as P;
        let m = |p| Matcher::compile(&on_path(p)).unwrap();
        let get = |uri| parts("GET", uri, &[]);
        assert!(m(P::Path("/a".into())).matches(&get("/a?x=1")));
        assert!(!m(P::Path("/a".into())).matches(&get("/a/b")));
        assert!(m(P::Prefix("/api".into())).matches(&get("/api/v1")));
        assert!(!m(P::Prefix("/api".into())).matches(&get("/API/v1")));
        let r = m(P::SafeRegex(regex("/item/[0-9]+")));
        assert!(r.matches(&get("/item/42?x=y")));
        assert!(!r.matches(&get("/item/42/more")), "the whole path, not a part of it");
        let mut insensitive = on_path(P::Prefix("/API".into()));
        insensitive.case_sensitive = Some(BoolValue { value: false });
        assert!(Matcher::compile(&insensitive).unwrap().matches(&get("/api/v1")));
        assert!(Matcher::compile(&on_path(P::SafeRegex(regex("(")))).is_err());
    }

    #[test]
    fn headers_pseudo_headers_inversion_and_absence() {
        use header_matcher::HeaderMatchSpecifier as H;
        use string_matcher::MatchPattern as S;
        let with = |hs: Vec<HeaderMatcher>| {
            let mut rm = on_path(route_match::PathSpecifier::Prefix("/".into()));
            rm.headers = hs;
            Matcher::compile(&rm).unwrap()
        };
        let req = parts(
            "POST",
            "http://reviews:9080/",
            &[("end-user", "jason"), ("x-multi", "a"), ("x-multi", "b")],
        );
        for (spec, want) in [
            (S::Exact("jason".into()), true),
            (S::Prefix("ja".into()), true),
            (S::Suffix("son".into()), true),
            (S::Contains("aso".into()), true),
            (S::SafeRegex(regex("j.*n")), true),
            (S::SafeRegex(regex("j")), false),
            (S::Exact("Jason".into()), false),
        ] {
            let m = with(vec![header("end-user", H::StringMatch(string(spec.clone())), false)]);
            assert_eq!(m.matches(&req), want, "{spec:?}");
            let inverted = with(vec![header("end-user", H::StringMatch(string(spec.clone())), true)]);
            assert_eq!(inverted.matches(&req), !want, "inverted {spec:?}");
        }
        let mut folded = string(S::Exact("JASON".into()));
        folded.ignore_case = true;
        assert!(with(vec![header("end-user", H::StringMatch(folded), false)]).matches(&req));
        for (name, pattern) in [
            (":method", S::Exact("POST".into())),
            (":authority", S::Prefix("reviews".into())),
            ("x-multi", S::Exact("a,b".into())),
        ] {
            let m = with(vec![header(name, H::StringMatch(string(pattern)), false)]);
            assert!(m.matches(&req), "{name}");
        }
        // Absent headers: only "not present" and inverted value matchers take the request.
        assert!(with(vec![header("x-none", H::PresentMatch(false), false)]).matches(&req));
        assert!(!with(vec![header("x-none", H::PresentMatch(true), false)]).matches(&req));
        assert!(
            with(vec![header(
                "x-none",
                H::StringMatch(string(S::Exact("v".into()))),
                true
            )])
            .matches(&req)
        );
        assert!(!with(vec![header("x-none", H::PresentMatch(true), true)]).matches(&req));
        assert!(with(vec![header("end-user", H::PresentMatch(true), false)]).matches(&req));
        // Every matcher must hold.
        assert!(
            !with(vec![
                header("end-user", H::PresentMatch(true), false),
                header(":method", H::StringMatch(string(S::Exact("GET".into()))), false),
            ])
            .matches(&req)
        );
    }

    proptest::proptest! {
        /// A prefix takes exactly the paths that start with it, and ignoring case takes
        /// them in any case.
        #[test]
        fn a_prefix_takes_what_starts_with_it(prefix in "/[a-zA-Z0-9/]{0,8}", rest in "[a-zA-Z0-9/]{0,8}", other in "/[a-zA-Z0-9/]{0,16}") {
            let m = Matcher::compile(&on_path(route_match::PathSpecifier::Prefix(prefix.clone()))).unwrap();
            let get = |p: &str| parts("GET", p, &[]);
            let longer = format!("{prefix}{rest}");
            proptest::prop_assert!(m.matches(&get(&longer)));
            proptest::prop_assert_eq!(m.matches(&get(&other)), other.starts_with(&prefix));
            let mut insensitive = on_path(route_match::PathSpecifier::Prefix(prefix.to_ascii_uppercase()));
            insensitive.case_sensitive = Some(BoolValue { value: false });
            let m = Matcher::compile(&insensitive).unwrap();
            let lower = format!("{}{rest}", prefix.to_ascii_lowercase());
            proptest::prop_assert!(m.matches(&get(&lower)));
        }
    }

    #[test]
    fn query_parameters() {
        use query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let with = |name: &str, spec| {
            let mut rm = on_path(route_match::PathSpecifier::Prefix("/".into()));
            rm.query_parameters = vec![QueryParameterMatcher {
                name: name.into(),
                query_parameter_match_specifier: Some(spec),
            }];
            Matcher::compile(&rm).unwrap()
        };
        let req = parts("GET", "/p?debug&user=jason&x=1", &[]);
        assert!(
            with(
                "user",
                Q::StringMatch(string(string_matcher::MatchPattern::Exact("jason".into())))
            )
            .matches(&req)
        );
        assert!(
            with(
                "user",
                Q::StringMatch(string(string_matcher::MatchPattern::SafeRegex(regex("j.*"))))
            )
            .matches(&req)
        );
        assert!(
            !with(
                "user",
                Q::StringMatch(string(string_matcher::MatchPattern::Exact("json".into())))
            )
            .matches(&req)
        );
        assert!(with("debug", Q::PresentMatch(true)).matches(&req));
        assert!(!with("other", Q::PresentMatch(true)).matches(&req));
        assert!(
            !with(
                "other",
                Q::StringMatch(string(string_matcher::MatchPattern::Exact(String::new())))
            )
            .matches(&req)
        );
    }
}
