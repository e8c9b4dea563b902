//! The caller's SPIFFE ID from Envoy's `x-forwarded-client-cert` header: elements separated
//! by `,`, each `Key=Value` pairs separated by `;`, values optionally double-quoted (quotes
//! escaped with `\`). Each proxy appends its own element, so the last one is the nearest
//! caller's.

/// The `URI=` of the last element of an XFCC header value, if it has one.
pub fn caller_uri(header: &str) -> Option<String> {
    let last = split_unquoted(header, ',').pop()?;
    split_unquoted(&last, ';').into_iter().find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("uri")
            .then(|| unquote(v.trim()))
            .filter(|v| !v.is_empty())
    })
}

/// Splits at `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for ch in s.chars() {
        let cur = out.last_mut().expect("never empty");
        match ch {
            _ if escaped => {
                escaped = false;
                cur.push(ch);
            }
            '\\' if quoted => {
                escaped = true;
                cur.push(ch);
            }
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            c if c == sep && !quoted => out.push(String::new()),
            c => cur.push(c),
        }
    }
    out
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => v.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_last_elements_uri() {
        let istio = "By=spiffe://cluster.local/ns/default/sa/bookinfo-reviews;Hash=0a1b;Subject=\"\";URI=spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        assert_eq!(
            caller_uri(istio).as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/bookinfo-productpage")
        );
        let two = "URI=spiffe://a/ns/x/sa/first,By=b;URI=\"spiffe://a/ns/x/sa/second\"";
        assert_eq!(caller_uri(two).as_deref(), Some("spiffe://a/ns/x/sa/second"));
        let tricky = "Subject=\"CN=a,O=b;c\";uri=spiffe://td/ns/n/sa/s";
        assert_eq!(caller_uri(tricky).as_deref(), Some("spiffe://td/ns/n/sa/s"));
        assert_eq!(caller_uri("By=spiffe://x;Hash=1"), None);
        assert_eq!(caller_uri("URI="), None);
        assert_eq!(caller_uri(""), None);
    }
}
