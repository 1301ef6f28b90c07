//! libFuzzer target: the HTTP mode's request and response head parsers and their framing on
//! arbitrary bytes. They must never panic; a head they accept must lie inside the input, and the
//! head written for the other side must parse again with the same framing (what the balancer
//! passes on is read by the next hop exactly as the balancer read it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlab::serve::h1::{self, ClientConnection};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    for is_head in [false, true] {
        if let Ok(Some(resp)) =
            h1::parse_response(data, 8192, is_head, ClientConnection::Keep, &mut out)
        {
            assert!(resp.head_len <= data.len());
            let mut again = Vec::new();
            let reread = h1::parse_response(&out, 8192, is_head, ClientConnection::Keep, &mut again)
                .expect("our own head parses")
                .expect("our own head is complete");
            assert_eq!(reread.framing, resp.framing);
            assert_eq!(reread.status, resp.status);
        }
    }
    if let Ok(Some(req)) = h1::parse_request(data, 8192, "127.0.0.1:9002", &mut out) {
        assert!(req.head_len <= data.len());
        let mut again = Vec::new();
        let reread = h1::parse_request(&out, 8192, "127.0.0.1:9002", &mut again)
            .expect("our own head parses")
            .expect("our own head is complete");
        assert_eq!(reread.framing, req.framing);
        assert_eq!(reread.retryable, req.retryable);
    }
});
