//! Durations as Istio's CRDs write them: Go's duration syntax (`1s`, `300ms`,
//! `1m30s`, `0.5s`), which is also what the protobuf JSON form (`1.5s`) looks like.

use std::fmt;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration read from Istio's string form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

/// Why a duration string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration `{0}`: expected a number and a unit (ns, us, ms, s, m, h), e.g. 1s or 300ms")]
pub struct DurationError(pub String);

impl Duration {
    /// Parses Go's duration syntax: one or more `<number><unit>` terms.
    pub fn parse(text: &str) -> Result<Self, DurationError> {
        let bad = || DurationError(text.to_owned());
        let mut rest = text.trim();
        if rest == "0" {
            return Ok(Duration(StdDuration::ZERO));
        }
        if rest.is_empty() || rest.starts_with('-') {
            return Err(bad());
        }
        let mut total = 0f64;
        while !rest.is_empty() {
            let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
            let (num, tail) = rest.split_at(num_len);
            let value: f64 = num.parse().map_err(|_| bad())?;
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let scale = match unit {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            };
            total += value * scale;
            rest = tail;
        }
        StdDuration::try_from_secs_f64(total).map(Duration).map_err(|_| bad())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gos_duration_syntax() {
        let ms = |t: &str| Duration::parse(t).map(|d| d.0.as_millis());
        assert_eq!(ms("1s"), Ok(1000));
        assert_eq!(ms("300ms"), Ok(300));
        assert_eq!(ms("1m"), Ok(60_000));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("0"), Ok(0));
        assert!(Duration::parse("7").is_err(), "a unit is required");
        assert!(Duration::parse("-1s").is_err());
        assert!(Duration::parse("1 fortnight").is_err());
    }
}
