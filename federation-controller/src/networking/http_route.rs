//! Gateway API's `HTTPRoute` (`gateway.networking.k8s.io`, `v1` or `v1beta1`), as far
//! as a mesh reads it: routes whose `parentRefs` name a Service (GAMMA) apply to the
//! sidecars' traffic to that Service. Typed with the spec's field names; validated
//! with the rules the Gateway API's CRD schema and CEL enforce (so what an API server
//! would refuse is refused here too), [`crate::routing::gamma`] translates them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{Duration, ValidationError, port_in_range};

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The versions of `HTTPRoute` accepted (one schema).
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// An `HTTPRoute` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

/// What an HTTPRoute says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    /// Ignored for Service parents, as GAMMA says (the Service already is the host).
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
}

/// What the route attaches to: a Gateway, or (GAMMA) a Service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentRef {
    /// Unset is the Gateway API's group; `""` or `core` with kind `Service` is a Service.
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<i64>,
}

impl ParentRef {
    /// Whether it names a Service (GAMMA's parent), not a Gateway.
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service") && matches!(self.group.as_deref(), Some("" | "core"))
    }
}

/// One rule: the requests it matches, its filters and where they go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Rule {
    pub name: Option<String>,
    /// Any of them (OR); none is a `PathPrefix /` match.
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
}

/// The conditions of one match (AND).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

/// `path: {type: PathPrefix, value: /}` (both defaulted by the CRD schema).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PathMatch {
    pub r#type: Option<String>,
    pub value: Option<String>,
}

/// How a path is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Exact,
    /// Element-wise: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix,
    Regex,
}

impl PathMatch {
    /// The kind and value, with the schema's defaults.
    pub fn kind_value(&self) -> (PathKind, &str) {
        let kind = match self.r#type.as_deref() {
            Some("Exact") => PathKind::Exact,
            Some("RegularExpression") => PathKind::Regex,
            _ => PathKind::Prefix,
        };
        (kind, self.value.as_deref().unwrap_or("/"))
    }
}

/// A header or query parameter match: `type` Exact (the default) or RegularExpression.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ValueMatch {
    pub r#type: Option<String>,
    pub name: String,
    pub value: String,
}

impl ValueMatch {
    /// Whether the value is a regular expression (else it is matched exactly).
    pub fn is_regex(&self) -> bool {
        self.r#type.as_deref() == Some("RegularExpression")
    }
}

/// A filter of a rule or of one backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Filter {
    pub r#type: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<Redirect>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    pub request_mirror: Option<Mirror>,
}

/// `set` overwrites, `add` appends, `remove` removes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeaderModifier {
    pub set: Vec<NameValue>,
    pub add: Vec<NameValue>,
    pub remove: Vec<String>,
}

/// A header and its value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

/// A redirect answered by the proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<i64>,
    /// 302 when unset.
    pub status_code: Option<u32>,
}

/// How a path is rewritten or redirected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PathModifier {
    pub r#type: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

/// Rewrites of the forwarded request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// A copy of each request sent to another backend, its answer dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Mirror {
    pub backend_ref: BackendRef,
    pub percent: Option<i64>,
    pub fraction: Option<Fraction>,
}

/// `numerator / denominator` (100 when unset).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fraction {
    pub numerator: i64,
    pub denominator: Option<i64>,
}

/// Where requests go: a Service (the default kind) and port, with a weight.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    /// 1 when unset.
    pub weight: Option<i64>,
    /// Header modifiers applied to requests sent to this backend only.
    pub filters: Vec<Filter>,
}

impl BackendRef {
    /// Whether it names a Service (the only backend kind a mesh routes to).
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), None | Some("" | "core"))
            && matches!(self.kind.as_deref(), None | Some("Service"))
    }
}

/// `timeouts.request` bounds the whole request (retries included), `backendRequest` each try.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

const FILTER_TYPES: [&str; 5] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
];
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl HttpRoute {
    /// The Gateway API's schema and CEL rules this controller relies on, in their words.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let spec = &self.spec;
        if spec.parent_refs.len() > 32 {
            return Err(ValidationError::new(
                "spec.parentRefs",
                "Too many: must have at most 32 items",
            ));
        }
        for (i, p) in spec.parent_refs.iter().enumerate() {
            let f = format!("spec.parentRefs[{i}]");
            if p.name.is_empty() {
                return Err(ValidationError::new(format!("{f}.name"), "Required value"));
            }
            if let Some(port) = p.port {
                port_in_range(&format!("{f}.port"), port)?;
            }
        }
        if spec.rules.len() > 16 {
            return Err(ValidationError::new(
                "spec.rules",
                "Too many: must have at most 16 items",
            ));
        }
        for (i, r) in spec.rules.iter().enumerate() {
            r.validate(&format!("spec.rules[{i}]"))?;
        }
        Ok(())
    }
}

impl Rule {
    fn validate(&self, f: &str) -> Result<(), ValidationError> {
        for (j, m) in self.matches.iter().enumerate() {
            m.validate(&format!("{f}.matches[{j}]"))?;
        }
        validate_filters(&format!("{f}.filters"), &self.filters, false)?;
        let has = |t: &str| self.filters.iter().any(|x| x.r#type == t);
        if has("RequestRedirect") && has("URLRewrite") {
            return Err(ValidationError::new(
                format!("{f}.filters"),
                "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both",
            ));
        }
        if has("RequestRedirect") && !self.backend_refs.is_empty() {
            return Err(ValidationError::new(
                f,
                "RequestRedirect filter must not be used together with backendRefs",
            ));
        }
        let prefix_replaced = self.filters.iter().any(|x| {
            [
                x.request_redirect.as_ref().and_then(|r| r.path.as_ref()),
                x.url_rewrite.as_ref().and_then(|r| r.path.as_ref()),
            ]
            .into_iter()
            .flatten()
            .any(|p| p.r#type == "ReplacePrefixMatch")
        });
        let one_prefix =
            matches!(&self.matches[..], [m] if m.path.as_ref().is_none_or(|p| p.kind_value().0 == PathKind::Prefix));
        if prefix_replaced && !one_prefix {
            return Err(ValidationError::new(
                f,
                "When using URLRewrite or RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
            ));
        }
        for (j, b) in self.backend_refs.iter().enumerate() {
            let bf = format!("{f}.backendRefs[{j}]");
            validate_backend(&bf, b)?;
            if let Some(w) = b.weight
                && !(0..=1_000_000).contains(&w)
            {
                return Err(ValidationError::new(
                    format!("{bf}.weight"),
                    "Invalid value: must be between 0 and 1000000",
                ));
            }
            validate_filters(&format!("{bf}.filters"), &b.filters, true)?;
        }
        Ok(())
    }
}

impl RouteMatch {
    fn validate(&self, f: &str) -> Result<(), ValidationError> {
        if let Some(p) = &self.path {
            if let Some(t) = p.r#type.as_deref()
                && !["Exact", "PathPrefix", "RegularExpression"].contains(&t)
            {
                return Err(ValidationError::new(
                    format!("{f}.path.type"),
                    format!(
                        "Unsupported value: \"{t}\": supported values: \"Exact\", \"PathPrefix\", \"RegularExpression\""
                    ),
                ));
            }
            let (kind, value) = p.kind_value();
            match kind {
                PathKind::Regex => {
                    regex::Regex::new(value)
                        .map_err(|e| ValidationError::new(format!("{f}.path.value"), format!("invalid regex: {e}")))?;
                }
                _ if !value.starts_with('/') => {
                    return Err(ValidationError::new(
                        format!("{f}.path.value"),
                        "value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']",
                    ));
                }
                _ if value.contains("//") || value.contains("/./") || value.contains("/../") || value.contains('#') => {
                    return Err(ValidationError::new(
                        format!("{f}.path.value"),
                        "must not contain '//', '/./', '/../' or '#' when type one of ['Exact', 'PathPrefix']",
                    ));
                }
                _ => {}
            }
        }
        for (what, list) in [("headers", &self.headers), ("queryParams", &self.query_params)] {
            for (k, v) in list.iter().enumerate() {
                let vf = format!("{f}.{what}[{k}]");
                if v.name.is_empty() {
                    return Err(ValidationError::new(format!("{vf}.name"), "Required value"));
                }
                match v.r#type.as_deref() {
                    None | Some("Exact") => {}
                    Some("RegularExpression") => {
                        regex::Regex::new(&v.value)
                            .map_err(|e| ValidationError::new(format!("{vf}.value"), format!("invalid regex: {e}")))?;
                    }
                    Some(t) => {
                        return Err(ValidationError::new(
                            format!("{vf}.type"),
                            format!("Unsupported value: \"{t}\": supported values: \"Exact\", \"RegularExpression\""),
                        ));
                    }
                }
            }
        }
        if let Some(m) = &self.method
            && !METHODS.contains(&m.as_str())
        {
            return Err(ValidationError::new(
                format!("{f}.method"),
                format!("Unsupported value: \"{m}\""),
            ));
        }
        Ok(())
    }
}

/// A Service backend needs a port (the CRD's CEL rule); other kinds are left to
/// translation, which answers their share with a 500 as the spec says.
fn validate_backend(f: &str, b: &BackendRef) -> Result<(), ValidationError> {
    if b.name.is_empty() {
        return Err(ValidationError::new(format!("{f}.name"), "Required value"));
    }
    match b.port {
        None if b.is_service() => Err(ValidationError::new(f, "Must have port for Service reference")),
        Some(p) => port_in_range(&format!("{f}.port"), p),
        None => Ok(()),
    }
}

/// Each filter's type is one this controller applies, with its field set; a backend's
/// own filters may only modify headers.
fn validate_filters(f: &str, filters: &[Filter], backend: bool) -> Result<(), ValidationError> {
    for (k, x) in filters.iter().enumerate() {
        let xf = format!("{f}[{k}]");
        if !FILTER_TYPES.contains(&x.r#type.as_str()) || backend && !x.r#type.ends_with("HeaderModifier") {
            return Err(ValidationError::new(
                format!("{xf}.type"),
                format!("Unsupported value: \"{}\": not supported here", x.r#type),
            ));
        }
        let (set, field) = match x.r#type.as_str() {
            "RequestHeaderModifier" => (x.request_header_modifier.is_some(), "requestHeaderModifier"),
            "ResponseHeaderModifier" => (x.response_header_modifier.is_some(), "responseHeaderModifier"),
            "RequestRedirect" => (x.request_redirect.is_some(), "requestRedirect"),
            "URLRewrite" => (x.url_rewrite.is_some(), "urlRewrite"),
            _ => (x.request_mirror.is_some(), "requestMirror"),
        };
        if !set {
            return Err(ValidationError::new(
                format!("{xf}.{field}"),
                format!("filter.{field} must be specified for {} filter.type", x.r#type),
            ));
        }
        if let Some(r) = &x.request_redirect {
            if let Some(code) = r.status_code
                && ![301, 302].contains(&code)
            {
                return Err(ValidationError::new(
                    format!("{xf}.requestRedirect.statusCode"),
                    format!("Unsupported value: {code}: supported values: \"301\", \"302\""),
                ));
            }
            if let Some(p) = r.port {
                port_in_range(&format!("{xf}.requestRedirect.port"), p)?;
            }
        }
        for (name, path) in [
            (
                "requestRedirect",
                x.request_redirect.as_ref().and_then(|r| r.path.as_ref()),
            ),
            ("urlRewrite", x.url_rewrite.as_ref().and_then(|r| r.path.as_ref())),
        ] {
            let Some(p) = path else { continue };
            let ok = match p.r#type.as_str() {
                "ReplaceFullPath" => p.replace_full_path.is_some(),
                "ReplacePrefixMatch" => p.replace_prefix_match.is_some(),
                _ => false,
            };
            if !ok {
                return Err(ValidationError::new(
                    format!("{xf}.{name}.path"),
                    "replaceFullPath must be specified when type is set to 'ReplaceFullPath', replacePrefixMatch when 'ReplacePrefixMatch'",
                ));
            }
        }
        if let Some(m) = &x.request_mirror {
            validate_backend(&format!("{xf}.requestMirror.backendRef"), &m.backend_ref)?;
            if m.percent.is_some() && m.fraction.is_some() {
                return Err(ValidationError::new(
                    format!("{xf}.requestMirror"),
                    "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter",
                ));
            }
            if let Some(p) = m.percent
                && !(0..=100).contains(&p)
            {
                return Err(ValidationError::new(
                    format!("{xf}.requestMirror.percent"),
                    "Invalid value: must be between 0 and 100",
                ));
            }
            if let Some(fr) = &m.fraction
                && (fr.numerator < 0 || fr.denominator.is_some_and(|d| d < 1 || fr.numerator > d))
            {
                return Err(ValidationError::new(
                    format!("{xf}.requestMirror.fraction"),
                    "numerator must be less than or equal to denominator",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::objects::ClusterObjects;

    /// Each document is refused alone, naming file, document and field with the CRD's reason.
    #[test]
    fn invalid_routes_are_refused_one_by_one_with_the_crds_reasons() {
        let route = |n: &str, rules: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {n}, namespace: web}}\n\
                 spec: {{parentRefs: [{{group: \"\", kind: Service, name: reviews}}], rules: {rules}}}\n"
            )
        };
        let docs = [
            route("ok", "[{backendRefs: [{name: reviews, port: 9080}]}]"),
            route("no-port", "[{backendRefs: [{name: reviews}]}]"),
            route("relative", "[{matches: [{path: {type: Exact, value: foo}}]}]"),
            route("bad-regex", "[{matches: [{headers: [{type: RegularExpression, name: x, value: \"(\"}]}]}]"),
            route(
                "both",
                "[{filters: [{type: RequestRedirect, requestRedirect: {hostname: a}}, {type: URLRewrite, urlRewrite: {hostname: b}}]}]",
            ),
            route(
                "redirect-and-backend",
                "[{filters: [{type: RequestRedirect, requestRedirect: {hostname: a}}], backendRefs: [{name: r, port: 1}]}]",
            ),
            route(
                "prefix-on-exact",
                "[{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]",
            ),
            route("missing-field", "[{filters: [{type: RequestMirror}]}]"),
            route("code", "[{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]}]"),
            route("weight", "[{backendRefs: [{name: r, port: 1, weight: -1}]}]"),
            route("method", "[{matches: [{method: FETCH}]}]"),
        ]
        .join("---\n");
        let mut o = ClusterObjects::default();
        o.add_yaml(std::path::Path::new("c1/routes.yaml"), &docs).unwrap();
        assert_eq!(o.http_routes.len(), 1, "the valid route is kept");
        // The regex crate's own words for the pattern of document 4.
        let unclosed: &str = std::hint::black_box("(");
        let refused: Vec<String> = o.refused.iter().map(ToString::to_string).collect();
        let at = |d: usize, name: &str, rest: &str| {
            format!("c1/routes.yaml: document {d}: HTTPRoute web/{name} refused: {rest}")
        };
        assert_eq!(
            refused,
            [
                at(
                    2,
                    "no-port",
                    "spec.rules[0].backendRefs[0]: Must have port for Service reference"
                ),
                at(
                    3,
                    "relative",
                    "spec.rules[0].matches[0].path.value: value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']"
                ),
                at(
                    4,
                    "bad-regex",
                    &format!(
                        "spec.rules[0].matches[0].headers[0].value: invalid regex: {}",
                        regex::Regex::new(unclosed).unwrap_err()
                    )
                ),
                at(
                    5,
                    "both",
                    "spec.rules[0].filters: May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both"
                ),
                at(
                    6,
                    "redirect-and-backend",
                    "spec.rules[0]: RequestRedirect filter must not be used together with backendRefs"
                ),
                at(
                    7,
                    "prefix-on-exact",
                    "spec.rules[0]: When using URLRewrite or RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified"
                ),
                at(
                    8,
                    "missing-field",
                    "spec.rules[0].filters[0].requestMirror: filter.requestMirror must be specified for RequestMirror filter.type"
                ),
                at(
                    9,
                    "code",
                    "spec.rules[0].filters[0].requestRedirect.statusCode: Unsupported value: 307: supported values: \"301\", \"302\""
                ),
                at(
                    10,
                    "weight",
                    "spec.rules[0].backendRefs[0].weight: Invalid value: must be between 0 and 1000000"
                ),
                at(
                    11,
                    "method",
                    "spec.rules[0].matches[0].method: Unsupported value: \"FETCH\""
                ),
            ]
        );
    }
}
