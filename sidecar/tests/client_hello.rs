//! The ClientHello reader against ClientHellos made by a real TLS stack (rustls):
//! random names, ALPN lists and versions, cut into reads at random points and
//! re-fragmented into handshake records of random sizes.

use std::sync::Arc;

use proptest::prelude::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use sidecar::client_hello::{ClientHello, HelloError, parse};

/// The bytes a rustls client sends first: its ClientHello records.
fn first_flight(name: &str, alpn: &[Vec<u8>], tls12_only: bool) -> Vec<u8> {
    flight_with(rustls::crypto::aws_lc_rs::default_provider(), name, alpn, tls12_only)
}

fn flight_with(provider: rustls::crypto::CryptoProvider, name: &str, alpn: &[Vec<u8>], tls12_only: bool) -> Vec<u8> {
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.to_vec();
    let mut conn = ClientConnection::new(Arc::new(cfg), ServerName::try_from(name.to_owned()).unwrap()).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// The handshake bytes inside a run of records, re-wrapped into records of the given sizes.
fn refragment(wire: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut handshake = Vec::new();
    let mut off = 0;
    while off + 5 <= wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[off + 3], wire[off + 4]]));
        handshake.extend_from_slice(&wire[off + 5..off + 5 + len]);
        off += 5 + len;
    }
    let mut out = Vec::new();
    let mut rest = &handshake[..];
    let mut k = 0;
    while !rest.is_empty() {
        let n = sizes[k % sizes.len()].clamp(1, rest.len());
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        k += 1;
    }
    out
}

/// Feeds `wire` in reads ending at `cuts`, as a socket would, and returns the result.
fn feed(wire: &[u8], cuts: &[usize], max: usize) -> Result<Option<ClientHello>, HelloError> {
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % wire.len()).collect();
    ends.sort_unstable();
    for &end in &ends {
        assert_eq!(
            parse(&wire[..end], max),
            Ok(None),
            "a prefix of {end} bytes must ask for more"
        );
    }
    parse(wire, max)
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?"
}

/// A top-level label; all-digit ones are refused by TLS stacks as IP-like.
fn tld() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,9}"
}

fn dns_name() -> impl Strategy<Value = String> {
    prop_oneof![
        (proptest::collection::vec(label(), 0..4), tld()).prop_map(|(mut l, t)| {
            l.push(t);
            l.join(".")
        }),
        // Istio's cross-network form, underscores and all.
        (
            1u16..,
            proptest::option::of(label()),
            proptest::collection::vec(label(), 1..4),
            tld()
        )
            .prop_map(|(port, subset, mut host, t)| {
                host.push(t);
                format!("outbound_.{port}_.{}_.{}", subset.unwrap_or_default(), host.join("."))
            }),
    ]
}

fn alpn_list() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let istio = prop_oneof![
        Just(b"istio".to_vec()),
        Just(b"istio-peer-exchange".to_vec()),
        Just(b"istio-http/1.0".to_vec()),
        Just(b"istio-http/1.1".to_vec()),
        Just(b"istio-h2".to_vec()),
        Just(b"h2".to_vec()),
        proptest::collection::vec(any::<u8>(), 1..40),
    ];
    proptest::collection::vec(istio, 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn reads_what_rustls_sends_however_it_is_cut(
        name in dns_name(),
        alpn in alpn_list(),
        tls12_only in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let wire = first_flight(&name, &alpn, tls12_only);
        let hello = feed(&wire, &cuts, 1 << 16).unwrap().expect("a whole hello");
        prop_assert_eq!(hello.server_name.as_deref(), Some(name.as_str()));
        prop_assert_eq!(hello.alpn, alpn);
        prop_assert_eq!(hello.wire_len, wire.len());
    }

    #[test]
    fn reads_a_hello_spread_over_many_records(
        name in dns_name(),
        alpn in alpn_list(),
        sizes in proptest::collection::vec(1usize..700, 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let wire = refragment(&first_flight(&name, &alpn, false), &sizes);
        let hello = feed(&wire, &cuts, 1 << 20).unwrap().expect("a whole hello");
        prop_assert_eq!(hello.server_name.as_deref(), Some(name.as_str()));
        prop_assert_eq!(hello.alpn, alpn);
        prop_assert_eq!(hello.wire_len, wire.len());
    }

    #[test]
    fn never_panics_on_damaged_hellos(
        name in dns_name(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        truncate in any::<usize>(),
    ) {
        let mut wire = first_flight(&name, &[b"istio".to_vec()], false);
        for (at, byte) in flips {
            let i = at % wire.len();
            wire[i] = byte;
        }
        wire.truncate(truncate % (wire.len() + 1));
        let _ = parse(&wire, 1 << 16);
    }
}

#[test]
fn a_post_quantum_hello_is_bigger_than_one_kilobyte_and_still_read() {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let pq = rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519MLKEM768, kx_group::X25519],
        ..default_provider()
    };
    let wire = flight_with(pq, "reviews.default.svc.cluster.local", &[b"istio".to_vec()], false);
    // An X25519MLKEM768 key share makes the hello over 1 KiB, so a reader that
    // expects it in one small read would fail here.
    assert!(wire.len() > 1024, "{} bytes", wire.len());
    assert!(parse(&wire, 1 << 16).unwrap().is_some());
    assert_eq!(parse(&wire, 512), Err(HelloError::TooLarge));
}

#[test]
fn no_sni_when_rustls_talks_to_an_ip_address() {
    let wire = first_flight("10.0.0.1", &[], false);
    assert_eq!(parse(&wire, 1 << 16).unwrap().unwrap().server_name, None);
}
