//! The ClientHello reader against ClientHellos made by real TLS stacks: rustls
//! clients with random names, ALPN lists, versions and key shares, cut into
//! reads at random points and re-fragmented into handshake records of random
//! sizes; and hellos OpenSSL's `s_client` sent, captured in `tests/data/`.

use std::sync::Arc;

use proptest::prelude::*;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion};
use sidecar::client_hello::{ClientHello, HelloError, parse};

const LIMIT: usize = 1 << 16;

/// Key exchange groups to offer; the first gets a key share, so this decides
/// the hello's size: an X25519MLKEM768 share takes it over 1 KiB, an
/// MLKEM1024 one over 1.5 KiB.
fn kx(choice: usize) -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    match choice % 4 {
        0 => vec![kx_group::X25519],
        1 => vec![kx_group::X25519MLKEM768, kx_group::X25519],
        2 => vec![kx_group::MLKEM1024, kx_group::SECP256R1],
        _ => vec![kx_group::SECP384R1, kx_group::X25519],
    }
}

/// The bytes a rustls client sends first: its ClientHello records.
fn first_flight(name: &str, alpn: &[Vec<u8>], tls12_only: bool, kx_choice: usize) -> Vec<u8> {
    let provider = CryptoProvider {
        kx_groups: kx(kx_choice),
        ..default_provider()
    };
    let versions: &[&SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.to_vec();
    let server = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = ClientConnection::new(Arc::new(cfg), server).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// The handshake bytes inside a run of records.
fn handshake_bytes(wire: &[u8]) -> Vec<u8> {
    let mut handshake = Vec::new();
    let mut off = 0;
    while off + 5 <= wire.len() {
        assert_eq!(wire[off], 22, "rustls sends only handshake records first");
        let len = usize::from(u16::from_be_bytes([wire[off + 3], wire[off + 4]]));
        handshake.extend_from_slice(&wire[off + 5..off + 5 + len]);
        off += 5 + len;
    }
    handshake
}

/// `handshake` wrapped into records whose sizes cycle through `sizes`.
fn into_records(handshake: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, chunk) in sizes.iter().cycle().scan(handshake, |rest, &n| {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(n.clamp(1, rest.len()));
        *rest = tail;
        Some((chunk.len(), chunk))
    }) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Feeds `wire` to the reader in reads ending at `cuts`, as a socket would,
/// checking that every earlier read asks for more, and returns the last answer.
fn feed(wire: &[u8], cuts: &[usize], max: usize) -> Result<Option<ClientHello>, HelloError> {
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % wire.len()).collect();
    ends.sort_unstable();
    for &end in &ends {
        assert_eq!(
            parse(&wire[..end], max),
            Ok(None),
            "a read of {end} bytes must ask for more"
        );
    }
    parse(wire, max)
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?"
}

/// A top-level label; TLS stacks refuse all-digit ones as IP-like.
fn tld() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,9}"
}

fn dns_name() -> impl Strategy<Value = String> {
    prop_oneof![
        (proptest::collection::vec(label(), 0..4), tld()).prop_map(|(mut l, t)| {
            l.push(t);
            l.join(".")
        }),
        // Istio's cross-network form: rustls accepts the underscores.
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
        // Long names, near DNS's 253-byte limit.
        (proptest::collection::vec("[a-z0-9]{63}", 3), tld()).prop_map(|(mut l, t)| {
            l.push(t);
            l.join(".")
        }),
    ]
}

fn alpn_list() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let proto = prop_oneof![
        Just(b"istio".to_vec()),
        Just(b"istio-peer-exchange".to_vec()),
        Just(b"istio-http/1.0".to_vec()),
        Just(b"istio-http/1.1".to_vec()),
        Just(b"istio-h2".to_vec()),
        Just(b"h2".to_vec()),
        proptest::collection::vec(any::<u8>(), 1..=255),
    ];
    proptest::collection::vec(proto, 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn reads_what_rustls_sends_however_it_is_cut(
        name in dns_name(),
        alpn in alpn_list(),
        tls12_only in any::<bool>(),
        kx_choice in any::<usize>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let wire = first_flight(&name, &alpn, tls12_only, kx_choice);
        let hello = feed(&wire, &cuts, LIMIT).unwrap().expect("a whole hello");
        prop_assert_eq!(hello.server_name.as_deref(), Some(name.as_str()));
        prop_assert_eq!(hello.alpn, alpn);
        prop_assert_eq!(hello.wire_len, wire.len());
    }

    #[test]
    fn reads_a_hello_spread_over_many_records(
        name in dns_name(),
        alpn in alpn_list(),
        tls12_only in any::<bool>(),
        kx_choice in any::<usize>(),
        sizes in proptest::collection::vec(1usize..700, 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let wire = into_records(&handshake_bytes(&first_flight(&name, &alpn, tls12_only, kx_choice)), &sizes);
        let hello = feed(&wire, &cuts, LIMIT).unwrap().expect("a whole hello");
        prop_assert_eq!(hello.server_name.as_deref(), Some(name.as_str()));
        prop_assert_eq!(hello.alpn, alpn);
        prop_assert_eq!(hello.wire_len, wire.len());
    }

    /// What the client sends next (a coalesced handshake message in the last
    /// record, then more records) is not read, nor waited for.
    #[test]
    fn stops_at_the_end_of_the_hello(
        name in dns_name(),
        kx_choice in any::<usize>(),
        sizes in proptest::collection::vec(1usize..2000, 1..4),
        coalesced in proptest::collection::vec(any::<u8>(), 0..40),
        after in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let handshake = handshake_bytes(&first_flight(&name, &[], false, kx_choice));
        let mut wire = into_records(&[&handshake[..], &coalesced].concat(), &sizes);
        // The hello ends with the record that holds its last byte.
        let expect = hello_wire_len(&wire, handshake.len());
        wire.extend_from_slice(&after);
        let hello = parse(&wire, LIMIT).unwrap().expect("a whole hello");
        prop_assert_eq!(hello.server_name.as_deref(), Some(name.as_str()));
        prop_assert_eq!(hello.wire_len, expect);
        prop_assert_eq!(parse(&wire[..expect], LIMIT), Ok(Some(hello)));
        prop_assert_eq!(parse(&wire[..expect - 1], LIMIT), Ok(None));
    }

    /// A valid hello is refused as too large exactly when its records exceed
    /// the limit, and a prefix is never refused for anything else.
    #[test]
    fn the_limit_is_exact(
        name in dns_name(),
        kx_choice in any::<usize>(),
        sizes in proptest::collection::vec(1usize..1500, 1..4),
        max in 0usize..3000,
        cut in any::<usize>(),
    ) {
        let wire = into_records(&handshake_bytes(&first_flight(&name, &[b"istio".to_vec()], false, kx_choice)), &sizes);
        let whole = parse(&wire, max);
        if max >= wire.len() {
            prop_assert!(matches!(whole, Ok(Some(_))));
        } else {
            prop_assert_eq!(&whole, &Err(HelloError::TooLarge));
        }
        let part = parse(&wire[..cut % (wire.len() + 1)], max);
        prop_assert!(part == Ok(None) || part == whole, "{:?} vs {:?}", part, whole);
    }

    /// Damaged hellos: never a panic, and the answer for any read is either
    /// "read more" or the answer for all of it.
    #[test]
    fn damaged_hellos_get_one_verdict(
        name in dns_name(),
        kx_choice in any::<usize>(),
        sizes in proptest::collection::vec(1usize..700, 1..4),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        truncate in any::<usize>(),
        cuts in proptest::collection::vec(any::<usize>(), 1..6),
        max in prop_oneof![Just(LIMIT), 0usize..3000],
    ) {
        let flight = first_flight(&name, &[b"istio".to_vec()], false, kx_choice);
        let mut wire = into_records(&handshake_bytes(&flight), &sizes);
        for (at, byte) in flips {
            let i = at % wire.len();
            wire[i] = byte;
        }
        wire.truncate(truncate % (wire.len() + 1));
        let whole = parse(&wire, max);
        if let Ok(Some(hello)) = &whole {
            prop_assert!(hello.wire_len <= wire.len() && hello.wire_len <= max);
        }
        if wire.len() >= max && !wire.is_empty() {
            prop_assert_ne!(&whole, &Ok(None), "a full buffer gets a verdict");
        }
        for cut in cuts {
            let part = parse(&wire[..cut % (wire.len() + 1)], max);
            prop_assert!(part == Ok(None) || part == whole, "{:?} vs {:?}", part, whole);
        }
    }
}

/// Where the record holding handshake byte `handshake_len - 1` ends.
fn hello_wire_len(wire: &[u8], handshake_len: usize) -> usize {
    let (mut off, mut seen) = (0, 0);
    loop {
        let len = usize::from(u16::from_be_bytes([wire[off + 3], wire[off + 4]]));
        off += 5 + len;
        seen += len;
        if seen >= handshake_len {
            return off;
        }
    }
}

#[test]
fn a_post_quantum_hello_is_bigger_than_one_kilobyte_and_still_read() {
    let wire = first_flight("reviews.default.svc.cluster.local", &[b"istio".to_vec()], false, 1);
    // An X25519MLKEM768 key share makes the hello over 1 KiB, so a reader that
    // expects it in one small read would fail here.
    assert!(wire.len() > 1024, "{} bytes", wire.len());
    let hello = parse(&wire, LIMIT).unwrap().unwrap();
    assert_eq!(hello.server_name.as_deref(), Some("reviews.default.svc.cluster.local"));
    assert_eq!(parse(&wire[..1024], LIMIT), Ok(None));
    assert_eq!(parse(&wire[..5], 1024), Err(HelloError::TooLarge));
}

#[test]
fn the_process_default_provider_works_too() {
    // What the gateway's own tests will do: the process-level provider.
    let _ = default_provider().install_default();
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from("outbound_.9080_.v1_.reviews.default.svc.cluster.local").unwrap();
    let mut conn = ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    let hello = parse(&wire, LIMIT).unwrap().unwrap();
    assert_eq!(
        hello.server_name.as_deref(),
        Some("outbound_.9080_.v1_.reviews.default.svc.cluster.local")
    );
    assert_eq!((hello.alpn, hello.wire_len), (vec![b"h2".to_vec()], wire.len()));
}

#[test]
fn no_sni_when_rustls_talks_to_an_ip_address() {
    let wire = first_flight("10.0.0.1", &[], false, 0);
    assert_eq!(parse(&wire, LIMIT).unwrap().unwrap().server_name, None);
}

/// Hellos OpenSSL 3.0's `s_client` sent to a listening socket.
#[test]
fn reads_hellos_captured_from_openssl() {
    // (bytes, server name, ALPN)
    type Captured = (&'static [u8], Option<&'static str>, &'static [&'static [u8]]);
    let cases: [Captured; 3] = [
        (
            include_bytes!("data/openssl-tls13-istio.bin"),
            Some("outbound_.9080_._.reviews.default.svc.cluster.local"),
            &[b"istio-peer-exchange", b"istio"],
        ),
        // `-servername Reviews.Default.svc.cluster.local`: read lowercased.
        (
            include_bytes!("data/openssl-tls12-no-alpn.bin"),
            Some("reviews.default.svc.cluster.local"),
            &[],
        ),
        (
            include_bytes!("data/openssl-tls13-no-sni.bin"),
            None,
            &[b"h2", b"http/1.1"],
        ),
    ];
    for (wire, name, alpn) in cases {
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut], LIMIT), Ok(None));
        }
        let hello = parse(wire, LIMIT).unwrap().unwrap();
        assert_eq!(hello.server_name.as_deref(), name);
        assert_eq!(hello.alpn, alpn);
        assert_eq!(hello.wire_len, wire.len());
        let spread = into_records(&handshake_bytes(wire), &[7, 100, 33]);
        assert_eq!(parse(&spread, LIMIT).unwrap().unwrap().server_name.as_deref(), name);
    }
}
