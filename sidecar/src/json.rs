//! Writing JSON text by hand, for the few fixed shapes the sidecar emits (access log lines,
//! OTLP spans), without a serializer dependency on the data path.

use std::fmt::Write;

/// Appends `s` as a JSON string (`null` for None).
pub fn string(out: &mut String, s: Option<&str>) {
    let Some(s) = s else {
        out.push_str("null");
        return;
    };
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        super::string(&mut s, Some("a\"b\\c\u{1}"));
        super::string(&mut s, None);
        assert_eq!(s, r#""a\"b\\c\u0001"null"#);
    }
}
