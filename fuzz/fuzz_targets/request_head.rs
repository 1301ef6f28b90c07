//! libFuzzer target: the server's request-head parser on arbitrary bytes, whole and in two
//! pieces, with a bound taken from the input. It must never panic, must respect the bound, and
//! must give the same answer for the pieces as for the whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlab::serve::http::{self, HeadError};

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, input)) = data.split_first() else {
        return;
    };
    let max = 16 + usize::from(knobs) * 32;
    let whole = http::parse_request_head(input, 0, max);
    match whole {
        Ok(Some(h)) => assert!(h.len <= input.len() && h.len <= max),
        Ok(None) => assert!(input.len() < max),
        Err(HeadError::TooLarge) => assert!(input.len() >= max),
        Err(HeadError::BadRequest) => {}
    }
    let cut = usize::from(knobs) % (input.len() + 1);
    let first = http::parse_request_head(&input[..cut], 0, max);
    let again = match first {
        Ok(None) => http::parse_request_head(input, cut, max),
        done => done,
    };
    assert_eq!(again, whole);
});
