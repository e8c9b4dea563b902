//! The names a client sends, through the grammars that face the network: Istio's
//! cross-network SNI (pinned to an endpoint or not) and SPIFFE IDs. Never a panic, and whatever parses prints
//! back to a name that parses to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_vocab::{IstioSni, SpiffeId};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(sni) = IstioSni::parse(s) {
        assert_eq!(IstioSni::parse(&sni.to_string()).as_ref(), Ok(&sni));
        assert!(s.eq_ignore_ascii_case(&sni.to_string()));
    }
    // A pin that reads is the one that prints: the gateway and the sidecar agree on it.
    if let (Some(addr), rest) = mesh_vocab::sni::unpin(s) {
        assert!(mesh_vocab::sni::pin(addr, rest).eq_ignore_ascii_case(s));
    }
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
    }
});
