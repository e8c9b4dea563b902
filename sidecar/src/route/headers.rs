//! Header mutations a route, a weighted cluster, a virtual host or the whole configuration
//! asks for: `*_headers_to_add` with Envoy's append actions, and `*_headers_to_remove`.

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::Invalid;

/// One level's mutations of one direction (request or response).
#[derive(Debug, Clone, Default)]
pub struct Mutations {
    add: Vec<(HeaderName, HeaderValue, HeaderAppendAction)>,
    remove: Vec<HeaderName>,
}

impl Mutations {
    /// Compiles `to_add` / `to_remove`. The deprecated `append` flag, when given, decides
    /// as it did before `append_action` existed.
    pub fn compile(to_add: &[HeaderValueOption], to_remove: &[String]) -> Result<Self, Invalid> {
        let mut add = Vec::new();
        for option in to_add {
            let Some(h) = &option.header else { continue };
            let name = HeaderName::try_from(h.key.as_str()).map_err(|_| Invalid(format!("header name {:?}", h.key)))?;
            let raw = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value
            };
            let value = HeaderValue::from_bytes(raw).map_err(|_| Invalid(format!("value of header {:?}", h.key)))?;
            #[allow(deprecated)]
            let action = match option.append {
                Some(append) if append.value => HeaderAppendAction::AppendIfExistsOrAdd,
                Some(_) => HeaderAppendAction::OverwriteIfExistsOrAdd,
                None => HeaderAppendAction::try_from(option.append_action)
                    .map_err(|_| Invalid(format!("append action {} of header {:?}", option.append_action, h.key)))?,
            };
            add.push((name, value, action));
        }
        let remove = to_remove
            .iter()
            .map(|n| HeaderName::try_from(n.as_str()).map_err(|_| Invalid(format!("header name {n:?}"))))
            .collect::<Result<_, _>>()?;
        Ok(Self { add, remove })
    }

    /// Removes, then adds, as Envoy does.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, action) in &self.add {
            match action {
                HeaderAppendAction::AppendIfExistsOrAdd => {
                    headers.append(name.clone(), value.clone());
                }
                HeaderAppendAction::AddIfAbsent => {
                    if !headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
                HeaderAppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(name.clone(), value.clone());
                }
                HeaderAppendAction::OverwriteIfExists => {
                    if headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
            }
        }
    }
}

/// Both directions of one level.
#[derive(Debug, Clone, Default)]
pub struct HeaderPolicy {
    pub request: Mutations,
    pub response: Mutations,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue as EnvoyHeader;

    /// Adds header `k: v` by `action`.
    pub(in crate::route) fn option(k: &str, v: &str, action: HeaderAppendAction) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(EnvoyHeader {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    }

    #[test]
    fn append_actions_and_removal() {
        use HeaderAppendAction as A;
        let m = Mutations::compile(
            &[
                option("x-append", "2", A::AppendIfExistsOrAdd),
                option("x-set", "new", A::OverwriteIfExistsOrAdd),
                option("x-if-absent", "no", A::AddIfAbsent),
                option("x-fresh", "yes", A::AddIfAbsent),
                option("x-only-if-there", "no", A::OverwriteIfExists),
            ],
            &["x-gone".into()],
        )
        .unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-append", "1"),
            ("x-set", "old"),
            ("x-if-absent", "kept"),
            ("x-gone", "1"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        m.apply(&mut h);
        let all = |k: &str| h.get_all(k).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>();
        assert_eq!(all("x-append"), ["1", "2"]);
        assert_eq!(all("x-set"), ["new"]);
        assert_eq!(all("x-if-absent"), ["kept"]);
        assert_eq!(all("x-fresh"), ["yes"]);
        assert!(all("x-only-if-there").is_empty() && all("x-gone").is_empty());
        assert!(Mutations::compile(&[option("bad name", "v", A::AddIfAbsent)], &[]).is_err());
    }
}
