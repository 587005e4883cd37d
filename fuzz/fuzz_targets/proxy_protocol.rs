//! The PROXY protocol v2 parser: bytes from the network before TLS. Any
//! input gives a header or an error, never a panic; a parsed VPC endpoint id
//! is short and printable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xks_proxy::net::proxy_protocol::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse(data) {
        if let Some(id) = h.vpce_id {
            assert!(id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        }
    }
});
