//! Fuzz the control protocol codec (src/control/protocol.rs, src/control/server.rs): the request decoder the master runs on
//! every client line, the connection's line framing in front of it, and the reply decoder the
//! client runs on every line from the master. Nothing may panic; a rejected request must say
//! why; whatever decodes must re-encode (serde_json) to something that decodes to the same value.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

// zdd has no library target: include the modules themselves.
#[allow(dead_code, unused_imports)]
#[path = "../../src/clock.rs"]
mod clock;
#[allow(dead_code, unused_imports)]
#[path = "../../src/errno.rs"]
mod errno;
#[allow(dead_code, unused_imports)]
#[path = "../../src/control/protocol.rs"]
mod protocol;
#[allow(dead_code, unused_imports)]
#[path = "../../src/control/server.rs"]
mod server;
#[allow(dead_code, unused_imports)]
#[path = "../../src/sockfile.rs"]
mod sockfile;

use protocol::{decode_request, Reply};
use server::{Conn, Input};

fuzz_target!(|data: &[u8]| {
    requests(data);
    framing(data);
    replies(data);
});

/// The request decoder on the whole input as one line.
fn requests(data: &[u8]) {
    match decode_request(data) {
        Ok(r) => {
            let again = serde_json::to_vec(&r).expect("a decoded request encodes");
            assert!(!again.contains(&b'\n'), "an encoded request spans lines");
            let back = decode_request(&again).unwrap_or_else(|e| panic!("{r:?} re-encoded does not decode: {e}"));
            assert_eq!(back, r);
        }
        Err(e) => assert!(!e.trim().is_empty(), "request rejected without a message"),
    }
}

/// The master's side of a connection: the input arrives on a socket and the client hangs up
/// its writing side. The Conn must hand over exactly the first line (or all of it, at EOF
/// without newline), decoded as `decode_request` decodes it.
fn framing(data: &[u8]) {
    if data.len() > 32 * 1024 {
        return; // keep within the socket buffer: the writes below must not block
    }
    let Ok((master, mut client)) = UnixStream::pair() else {
        return;
    };
    let mut conn = Conn::from_fd(master.into());
    conn.deadline = Some(Instant::now() + Duration::from_secs(5)); // a fresh connection awaiting its request
    client.write_all(data).expect("writing to the socket pair");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = Input::Nothing;
    for _ in 0..64 {
        got = conn.read();
        if got != Input::Nothing || conn.dead {
            break;
        }
    }
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(nl) => &data[..nl],
        None => data,
    };
    let want = if data.is_empty() {
        assert!(conn.dead, "an empty connection is not dropped");
        Input::Nothing
    } else {
        match decode_request(line) {
            Ok(r) => Input::Request(r),
            Err(e) => Input::Bad(e),
        }
    };
    assert_eq!(got, want);
    // The answer to a bad request goes back on the same connection, one line.
    if let Input::Bad(msg) = got {
        conn.send(&Reply::err(msg.clone(), Value::Null));
        assert!(conn.dead, "a result did not end the conversation");
        drop(conn);
        let mut out = Vec::new();
        client.read_to_end(&mut out).expect("reading the reply");
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "reply is not one line");
        let reply: Reply = serde_json::from_slice(&out).expect("the reply decodes");
        assert_eq!(reply, Reply::err(msg, Value::Null));
    }
}

/// The client's side: the reply decoder, and `Reply::encode` round-trip.
fn replies(data: &[u8]) {
    let Ok(reply) = serde_json::from_slice::<Reply>(data) else {
        return;
    };
    let line = reply.encode();
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "an encoded reply spans lines"
    );
    let text = std::str::from_utf8(&line).expect("an encoded reply is UTF-8");
    // As the client reads it: a whole line, newline included.
    let back: Reply =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{reply:?} re-encoded does not decode: {e}"));
    let same = match (&back, &reply) {
        (Reply::Progress { message: a }, Reply::Progress { message: b }) => a == b,
        (
            Reply::Result {
                ok: a,
                message: m,
                data: d,
            },
            Reply::Result {
                ok: b,
                message: n,
                data: e,
            },
        ) => a == b && m == n && same_value(d, e),
        _ => false,
    };
    assert!(same, "reply changed in a round trip:\n{reply:?}\n{back:?}");
}

/// Equal JSON values, floats up to a few ULPs: serde_json (without its `float_roundtrip`
/// feature, as zdd builds it) may parse a float 1 ULP off, so a float is not always
/// reproduced bit for bit. Integers and everything else must be exact.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, a)| y.get(k).is_some_and(|b| same_value(a, b)))
        }
        _ => a == b,
    }
}
