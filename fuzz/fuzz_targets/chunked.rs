//! libFuzzer target: the HTTP mode's chunked-body scanner on arbitrary bytes, fed in two pieces
//! split where the input's first byte says. It must never panic; the end it finds must not
//! depend on where the body was split (a proxy that frames one stream two ways is a smuggling
//! hole), and must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlab::serve::h1::ChunkScanner;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let split = usize::from(split) % (body.len() + 1);
    let whole = ChunkScanner::new().scan(body);
    let mut pieces = ChunkScanner::new();
    let first = pieces.scan(&body[..split]);
    let joined = match first {
        Err(e) => Err(e),
        // The body ended inside the first piece: the second is the next message.
        Ok(n) if pieces.done() => Ok(n),
        Ok(n) => pieces.scan(&body[split..]).map(|m| n + m),
    };
    assert_eq!(whole, joined, "split at {split}");
    if let Ok(end) = whole {
        assert!(end <= body.len());
    }
});
