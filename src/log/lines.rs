//! [`LineBatch`]: worker lines formatted exactly as the master's logger would format them, but
//! in batches, one write per read of a worker's pipe.

use super::escape::{escape_controls, needs_escape, plain_ascii};
use super::{Sink, PAUSE_AT};
use crate::config::LogFormat;

/// Worker lines, formatted byte for byte as the master's logger formats a record with the
/// keys pid, generation and stream, but written in batches: one `write` per read of the
/// worker's pipe instead of one formatted record and one `write` per line. The lines of one
/// batch share one timestamp, taken when the batch began (when the pipe was read).
///
/// Callers flush before anything else is logged, so the order of records is kept.
pub struct LineBatch {
    sink: Sink,
    format: LogFormat,
    /// Text: "<timestamp> INFO "; JSON: the timestamp string, quoted.
    stamp: Vec<u8>,
    buf: Vec<u8>,
    /// Where the next relay turn starts among the workers, so that a slow log sink, which
    /// lets only the first few be read per turn, starves none of them.
    turn: usize,
    /// Bytes this batch may grow to before the sink is full ([`PAUSE_AT`]), as of the last
    /// look at the sink.
    room: usize,
    /// Lines in `buf`.
    lines: u64,
    /// JSON: what follows the message of every line of one stream in this batch,
    /// `","level":"INFO","ts":<stamp><tag>`, built when the stamp or the tag changes, so that a
    /// plain line is three copies (its start, its text, this) as in the text format.
    suffix: Vec<u8>,
    /// The tag `suffix` was built for.
    suffix_tag: Vec<u8>,
}

/// Flush a batch when it grows past this, so a flood of lines needs no more memory.
const BATCH_LIMIT: usize = 256 * 1024;

impl LineBatch {
    pub fn new(sink: Sink, format: LogFormat) -> LineBatch {
        LineBatch {
            sink,
            format,
            stamp: Vec::new(),
            buf: Vec::new(),
            turn: 0,
            room: PAUSE_AT,
            lines: 0,
            suffix: Vec::new(),
            suffix_tag: Vec::new(),
        }
    }

    /// Start a new batch: its lines get a timestamp taken when the first of them arrives.
    /// Cheap when no line follows (it is called on every turn of the master's loop).
    pub fn begin(&mut self) {
        self.stamp.clear();
        self.room = PAUSE_AT.saturating_sub(self.sink.pending());
    }

    /// Whether the log can take more lines now (see [`Sink::is_full`]).
    pub fn has_room(&self) -> bool {
        self.buf.len() < self.room
    }

    /// The first of `n` workers to read this turn; the next turn starts one further.
    pub fn next_turn(&mut self, n: usize) -> usize {
        self.turn = self.turn.wrapping_add(1);
        if n == 0 {
            0
        } else {
            self.turn % n
        }
    }

    fn take_stamp(&mut self) {
        self.suffix.clear();
        match self.format {
            LogFormat::Text => {
                let _ = slog_term::timestamp_local(&mut self.stamp);
                self.stamp.extend_from_slice(b" INFO ");
            }
            LogFormat::Json => {
                let ts = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
                let _ = serde_json::to_writer(&mut self.stamp, &ts);
            }
        }
    }

    /// The constant end of every line of one worker's stream: its keys, formatted once.
    pub fn tag(&self, pid: i32, generation: u64, stream: &str) -> Vec<u8> {
        match self.format {
            LogFormat::Text => format!(", pid: {pid}, generation: {generation}, stream: {stream}\n").into_bytes(),
            LogFormat::Json => {
                format!(",\"pid\":{pid},\"generation\":{generation},\"stream\":\"{stream}\"}}\n").into_bytes()
            }
        }
    }

    /// The constant end of every line of a reload hook's stream (`[hooks]`): a worker's keys
    /// and `hook`, the hook's name.
    pub fn hook_tag(&self, hook: &str, pid: i32, generation: u64, stream: &str) -> Vec<u8> {
        match self.format {
            LogFormat::Text => {
                format!(", pid: {pid}, generation: {generation}, stream: {stream}, hook: {hook}\n").into_bytes()
            }
            LogFormat::Json => {
                format!(",\"pid\":{pid},\"generation\":{generation},\"stream\":\"{stream}\",\"hook\":\"{hook}\"}}\n")
                    .into_bytes()
            }
        }
    }

    /// Format one line, ending with `tag` (from [`LineBatch::tag`]); returns it as text
    /// (invalid UTF-8 replaced), for the worker's tail.
    pub fn push<'a>(&mut self, line: &'a [u8], tag: &[u8]) -> std::borrow::Cow<'a, str> {
        if self.buf.len() >= BATCH_LIMIT {
            self.flush();
        }
        if self.stamp.is_empty() {
            self.take_stamp();
        }
        let (printable, json_plain) = plain_ascii(line);
        let text = if printable {
            // SAFETY: every byte is ASCII (0x20–0x7e), so the bytes are valid UTF-8.
            std::borrow::Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(line) })
        } else {
            String::from_utf8_lossy(line)
        };
        let b = &mut self.buf;
        match self.format {
            LogFormat::Text => {
                b.extend_from_slice(&self.stamp);
                if !printable && needs_escape(text.as_bytes()) {
                    escape_controls(text.as_bytes(), b);
                } else {
                    b.extend_from_slice(text.as_bytes());
                }
                if text.is_empty() {
                    // slog-term writes no separator after an empty message.
                    b.extend_from_slice(tag.strip_prefix(b", ").unwrap_or(tag));
                    self.lines += 1;
                    return text;
                }
            }
            LogFormat::Json => {
                if self.suffix.is_empty() || self.suffix_tag != tag {
                    self.suffix.clear();
                    self.suffix.extend_from_slice(b"\",\"level\":\"INFO\",\"ts\":");
                    self.suffix.extend_from_slice(&self.stamp);
                    self.suffix.extend_from_slice(tag);
                    self.suffix_tag.clear();
                    self.suffix_tag.extend_from_slice(tag);
                }
                if json_plain || text.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
                    b.extend_from_slice(b"{\"msg\":\"");
                    b.extend_from_slice(text.as_bytes());
                } else {
                    b.extend_from_slice(b"{\"msg\":");
                    let _ = serde_json::to_writer(&mut *b, &*text);
                    // The closing quote is the suffix's first byte.
                    b.pop();
                }
                b.extend_from_slice(&self.suffix);
                self.lines += 1;
                return text;
            }
        }
        b.extend_from_slice(tag);
        self.lines += 1;
        text
    }

    /// Hand what was formatted to the sink: written now, or pending (see [`Sink`]).
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.sink.commit_lines(&self.buf, self.lines);
            self.buf.clear();
            self.lines = 0;
            self.room = PAUSE_AT.saturating_sub(self.sink.pending());
        }
    }
}

#[cfg(test)]
mod tests {
    use slog::info;

    use super::*;
    use crate::config::LogTarget;
    use crate::log::build;

    /// What the logger and a batch write for the same worker line, timestamps cut out.
    fn both(format: LogFormat, line: &str) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (log, sink) = build(&LogTarget::File(path.clone()), format).unwrap();
        info!(log, "{}", line; "stream" => "stdout", "generation" => 7u64, "pid" => 42);
        let mut batch = LineBatch::new(sink, format);
        batch.begin();
        let tag = batch.tag(42, 7, "stdout");
        batch.push(line.as_bytes(), &tag);
        batch.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|l| match format {
                // "Nov 23 16:01:13.046 INFO ..." and "ts":"...": cut the time out.
                LogFormat::Text => l[19..].to_string(),
                LogFormat::Json => {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    assert!(v["ts"].as_str().unwrap().ends_with('Z'), "{l}");
                    v["ts"] = serde_json::Value::Null;
                    format!("{v} {}", l.find("\"ts\"").unwrap())
                }
            })
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        (lines[0].clone(), lines[1].clone())
    }

    #[test]
    fn batched_lines_read_exactly_like_logged_ones() {
        for format in [LogFormat::Text, LogFormat::Json] {
            for line in [
                "line 1",
                "",
                "quotes \" and \\ and\ttab",
                "ünïcödé €",
                "\x1b[31mred\0nul\r\u{9b}c1\x7f",
            ] {
                let (logged, batched) = both(format, line);
                assert_eq!(batched, logged, "{format:?} {line:?}");
            }
        }
    }

    /// The JSON suffix (level, timestamp, tag) is built once per stream and batch: lines of
    /// two streams interleaved in one batch each keep their own tag, and a line that needs
    /// escaping (or UTF-8 repair) between plain ones changes nothing around it.
    #[test]
    fn json_lines_of_interleaved_streams_keep_their_tags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (_log, sink) = build(&LogTarget::File(path.clone()), LogFormat::Json).unwrap();
        let mut batch = LineBatch::new(sink, LogFormat::Json);
        batch.begin();
        let out = batch.tag(42, 7, "stdout");
        let err = batch.tag(42, 7, "stderr");
        let lines: [(&[u8], &[u8]); 6] = [
            (b"plain", &out),
            (b"to \"err\" \\", &err),
            (b"bad \xff\xfe utf-8 \x01", &out),
            (b"", &err),
            (b"plain again", &err),
            (b"last", &out),
        ];
        for (line, tag) in lines {
            batch.push(line, tag);
        }
        batch.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let got: Vec<(String, String)> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["level"], "INFO", "{l}");
                assert_eq!(v["pid"], 42, "{l}");
                assert!(v["ts"].as_str().unwrap().ends_with('Z'), "{l}");
                (
                    v["msg"].as_str().unwrap().to_string(),
                    v["stream"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = lines
            .iter()
            .map(|(line, tag)| {
                let stream = if *tag == &out[..] { "stdout" } else { "stderr" };
                (String::from_utf8_lossy(line).into_owned(), stream.to_string())
            })
            .collect();
        assert_eq!(got, want, "{text}");
    }
}
