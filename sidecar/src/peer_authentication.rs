//! Istio's PeerAuthentication as the inbound side applies it: which mTLS mode holds for a
//! connection to a given port.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// `spec.mtls.mode` of a PeerAuthentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Only mutual TLS with an SVID of a trusted trust domain.
    Strict,
    /// Mutual TLS or plaintext, told apart by the first bytes the client sends.
    Permissive,
    /// Plaintext only; bytes are handed to the application as they arrive.
    Disable,
}

impl FromStr for MtlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "STRICT" => Ok(Self::Strict),
            "PERMISSIVE" => Ok(Self::Permissive),
            "DISABLE" => Ok(Self::Disable),
            other => Err(format!(
                "mTLS mode must be STRICT, PERMISSIVE or DISABLE, not {other:?}"
            )),
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disable => "DISABLE",
        })
    }
}

/// The effective policy for one workload: a mode, and per-port overrides
/// (`portLevelMtls`, keyed by the workload's target port as in Istio).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The mode for ports without an override.
    pub mode: MtlsMode,
    /// Port-level overrides.
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl Policy {
    /// One mode for every port.
    pub fn uniform(mode: MtlsMode) -> Self {
        Self {
            mode,
            ports: BTreeMap::new(),
        }
    }

    /// The mode for connections to `port`.
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

impl Default for Policy {
    /// Istio's mesh default is PERMISSIVE; ours is STRICT: a mesh that accepts plaintext
    /// unless told otherwise is not the promise users bought.
    fn default() -> Self {
        Self::uniform(MtlsMode::Strict)
    }
}

/// Parses a port override `PORT=MODE`.
pub fn parse_port_override(s: &str) -> Result<(u16, MtlsMode), String> {
    let (port, mode) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected PORT=MODE"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
    Ok((port, mode.parse()?))
}
