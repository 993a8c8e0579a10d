//! Control characters escaped for the text format, so that nothing a worker prints can forge
//! a log line or send escape sequences to a terminal (see the parent module), and the fast test
//! for the common line that needs no escaping at all.

use std::io::Write;

/// Append `text` to `out` with its control characters escaped: C0 controls but tab as `\xHH`,
/// DEL as `\x7f`, C1 controls (U+0080–U+009F) as `\u{HH}`.
pub fn escape_controls(text: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if (b < 0x20 && b != b'\t') || b == 0x7f {
            let _ = write!(out, "\\x{b:02x}");
        } else if b == 0xc2 && text.get(i + 1).is_some_and(|c| (0x80..=0x9f).contains(c)) {
            let _ = write!(out, "\\u{{{:x}}}", text[i + 1]);
            i += 1;
        } else {
            out.push(b);
        }
        i += 1;
    }
}

/// Whether [`escape_controls`] would change `text` (may say yes for text it leaves alone).
pub fn needs_escape(text: &[u8]) -> bool {
    text.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f || b == 0xc2)
}

/// Whether every byte of `line` is printable ASCII (0x20–0x7e), and whether moreover none is
/// a quote or a backslash: the common case, where a line needs neither UTF-8 repair nor
/// escaping, in text or JSON. Eight bytes at a time (the worker relay's hot path).
pub(super) fn plain_ascii(line: &[u8]) -> (bool, bool) {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // The high bit of a byte of `has(x)` is set if that byte of x is zero (exact as a whole:
    // a borrow only spreads above a byte that is zero already).
    let has_zero = |x: u64| x.wrapping_sub(LO) & !x;
    let mut text_bad = 0u64;
    let mut json_bad = 0u64;
    let mut chunks = line.chunks_exact(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        let x = u64::from_le_bytes(a);
        // >= 0x80 (x itself), < 0x20, DEL.
        text_bad |= x | (x.wrapping_sub(0x20 * LO) & !x) | has_zero(x ^ (0x7f * LO));
        json_bad |= has_zero(x ^ (b'"' as u64 * LO)) | has_zero(x ^ (b'\\' as u64 * LO));
    }
    let rest = chunks.remainder();
    let printable = text_bad & HI == 0 && rest.iter().all(|&b| (0x20..0x7f).contains(&b));
    let json = printable && json_bad & HI == 0 && !rest.iter().any(|&b| b == b'"' || b == b'\\');
    (printable, json)
}

/// `text` with its control characters escaped (see [`escape_controls`]).
pub fn escape_str(text: &str) -> std::borrow::Cow<'_, str> {
    if !needs_escape(text.as_bytes()) {
        return text.into();
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    escape_controls(text.as_bytes(), &mut out);
    // Only ASCII controls and whole two-byte C1 sequences were replaced, by ASCII.
    String::from_utf8_lossy(&out).into_owned().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ascii_is_exact() {
        let slow = |l: &[u8]| {
            let p = l.iter().all(|b| (0x20..0x7f).contains(b));
            (p, p && !l.iter().any(|&b| b == b'"' || b == b'\\'))
        };
        let mut line = b"a plain line of text, long enough for a few words".to_vec();
        assert_eq!(plain_ascii(&line), (true, true));
        for pos in 0..line.len() {
            for bad in [0u8, 1, 9, 0x1f, 0x20, b'"', b'\\', 0x7e, 0x7f, 0x80, 0xc2, 0xff] {
                let keep = line[pos];
                line[pos] = bad;
                assert_eq!(plain_ascii(&line), slow(&line), "{bad:#x} at {pos}");
                line[pos] = keep;
            }
        }
    }

    #[test]
    fn text_escapes_control_characters_but_tab() {
        let mut out = Vec::new();
        escape_controls("a\x1b[1m\0\r\n\tb\x7f\u{9b}é£".as_bytes(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\x1b[1m\\x00\\x0d\\x0a\tb\\x7f\\u{9b}é£"
        );
        assert_eq!(escape_str("plain"), "plain");
    }
}
