//! The ClientHello reader and the Istio SNI grammar on arbitrary bytes: never a
//! panic, and a prefix of the bytes never reads as something else.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::client_hello::parse;

fuzz_target!(|data: &[u8]| {
    for max in [256, 4096, 1 << 16] {
        let full = parse(data, max);
        if let Ok(Some(hello)) = &full {
            assert!(hello.wire_len <= data.len() && hello.wire_len <= max);
            // Cut before the end of the hello: the reader must ask for more, not
            // guess; cut after it: the same answer.
            for cut in [0, hello.wire_len / 2, hello.wire_len.saturating_sub(1)] {
                assert_eq!(parse(&data[..cut], max), Ok(None), "prefix {cut}");
            }
            assert_eq!(parse(&data[..hello.wire_len], max), full);
            if let Some(name) = &hello.server_name {
                let _ = mesh_vocab::IstioSni::parse(name);
            }
        }
    }
});
