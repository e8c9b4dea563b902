//! The ClientHello reader on arbitrary bytes: never a panic, never an answer
//! outside what the limit allows, and the answer for any prefix of the bytes
//! (an earlier read) is either "read more" or the answer for all of them, so
//! no later read can turn a refusal into a route or one route into another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::client_hello::parse;

fuzz_target!(|data: &[u8]| {
    // Below a record header, around the seeds' sizes, and roomy.
    for max in [8, 300, 1024, 1 << 16] {
        let whole = parse(data, max);
        match &whole {
            Ok(Some(hello)) => {
                assert!(hello.wire_len <= data.len() && hello.wire_len <= max);
                assert_eq!(parse(&data[..hello.wire_len], max), whole);
                if let Some(name) = &hello.server_name {
                    assert!(!name.is_empty());
                    assert!(name.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
                }
                assert!(hello.alpn.iter().all(|p| (1..=255).contains(&p.len())));
            }
            // A buffer as big as the limit always gets a verdict.
            Ok(None) => assert!(data.is_empty() || data.len() < max),
            Err(_) => {}
        }
        for cut in 0..data.len() {
            let part = parse(&data[..cut], max);
            assert!(
                part == Ok(None) || part == whole,
                "prefix {cut} at max {max}: {part:?} vs {whole:?}"
            );
        }
    }
});
