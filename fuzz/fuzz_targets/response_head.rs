//! libFuzzer target: the client's response-head parser on arbitrary bytes. It must never panic,
//! and the `Server` span it reports must lie inside the head.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlab::serve::http;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = http::parse_response_head(data, 0, 8192) {
        assert!(head.len <= data.len());
        if let Some((s, e)) = head.server {
            assert!(s <= e && e <= head.len);
        }
    }
});
