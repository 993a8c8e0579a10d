//! What the sink owes the log, as decisions only: which bytes are pending, which line was
//! begun and must be finished, what was lost and when to report it. The write itself is passed
//! in, so that every case (a short write, EAGAIN, disk full mid-line, a notice lost again) is a
//! unit test with a scripted target. See the theory of operation in the parent module.

use nix::errno::Errno;

use super::HARD_CAP;
use crate::errno::describe;

/// How a run of writes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    /// The target takes nothing now (EAGAIN): try again when it polls writable.
    Blocked,
    Failed(Errno),
}

/// Write `data` until it is all written, the target would block or fails.
fn write_some(write: &mut impl FnMut(&[u8]) -> Result<usize, Errno>, data: &[u8]) -> (usize, Outcome) {
    let mut done = 0;
    while done < data.len() {
        match write(&data[done..]) {
            Ok(0) => return (done, Outcome::Failed(Errno::EIO)),
            Ok(n) => done += n.min(data.len() - done),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return (done, Outcome::Blocked),
            Err(e) => return (done, Outcome::Failed(e)),
        }
    }
    (done, Outcome::Done)
}

/// The start of the line that `pos` is in.
fn line_start(data: &[u8], pos: usize) -> usize {
    data[..pos].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// The end of the line that `pos` is in: `pos` itself when it starts a line.
pub(super) fn line_end(data: &[u8], pos: usize) -> usize {
    if pos == 0 || data.get(pos - 1) == Some(&b'\n') {
        return pos;
    }
    match data[pos..].iter().position(|&b| b == b'\n') {
        Some(i) => pos + i + 1,
        None => data.len(),
    }
}

fn count_lines(data: &[u8]) -> u64 {
    let n = data.iter().filter(|&&b| b == b'\n').count() as u64;
    // A last line without its newline is a line too.
    n + u64::from(data.last().is_some_and(|&b| b != b'\n'))
}

/// What the sink owes the log: pending bytes and what was lost. Decisions only; the write is
/// passed in, so that every case is a unit test.
#[derive(Default)]
pub(super) struct Outbox {
    /// Pending bytes: whole lines, from the start of the first one, which may have been
    /// written in part (up to `head`).
    pub(super) buf: Vec<u8>,
    /// Bytes at the start of `buf` already written: 0, or within the first line (a line
    /// begun, which must be finished before anything else goes out or is dropped).
    pub(super) head: usize,
    /// The last write would have blocked: wait for the target to poll writable.
    pub(super) blocked: bool,
    /// A loss notice in `buf` not yet written in full: where it starts and ends, how many
    /// lines it reports.
    pub(super) notice: Option<(usize, usize, u64)>,
    /// Lines lost and not yet reported in the log.
    pub(super) unreported: u64,
    /// Why lines were lost last.
    pub(super) reason: String,
    pub(super) dropped_lines: u64,
    pub(super) dropped_bytes: u64,
    /// Worker lines handed to the sink (written, pending or lost after).
    pub(super) relayed_lines: u64,
    /// The error of the last write, until a write succeeds again.
    pub(super) error: Option<Errno>,
}

impl Outbox {
    pub(super) fn pending(&self) -> usize {
        self.buf.len() - self.head
    }

    pub(super) fn lose(&mut self, lines: u64, bytes: usize, reason: String) {
        self.dropped_lines = self.dropped_lines.saturating_add(lines);
        self.dropped_bytes = self.dropped_bytes.saturating_add(bytes as u64);
        self.unreported = self.unreported.saturating_add(lines);
        self.reason = reason;
    }

    /// Take `record` (whole lines): written at once if nothing is pending and the target takes
    /// it, else kept pending. `own`: a record of the master's, dropped past [`HARD_CAP`];
    /// worker lines are never dropped for want of room (the caller stops reading them).
    pub(super) fn commit(
        &mut self,
        record: &[u8],
        own: bool,
        write: &mut impl FnMut(&[u8]) -> Result<usize, Errno>,
        notice: impl FnOnce(u64, &str) -> Vec<u8>,
    ) {
        if record.is_empty() {
            return;
        }
        if own && self.pending() + record.len() > HARD_CAP {
            let why = format!("the log did not take them ({} bytes were pending)", self.pending());
            self.lose(count_lines(record), record.len(), why);
            return;
        }
        if self.pending() == 0 && self.unreported == 0 && !self.blocked {
            // The usual case: straight from the caller's buffer, no copy.
            self.buf.clear();
            self.head = 0;
            let (n, outcome) = write_some(write, record);
            match outcome {
                Outcome::Done => self.error = None,
                Outcome::Blocked => {
                    self.blocked = true;
                    let start = line_start(record, n);
                    self.buf.extend_from_slice(&record[start..]);
                    self.head = n - start;
                }
                Outcome::Failed(e) => {
                    // Keep the rest of a line begun; drop the lines after it.
                    let (start, keep) = (line_start(record, n), line_end(record, n));
                    self.buf.extend_from_slice(&record[start..keep]);
                    self.head = n - start;
                    self.failed(e, &record[keep..], 0);
                }
            }
            return;
        }
        if self.unreported > 0 {
            let text = notice(self.unreported, &self.reason);
            let start = self.buf.len();
            self.buf.extend_from_slice(&text);
            self.notice = Some((start, self.buf.len(), self.unreported));
            self.unreported = 0;
        }
        self.buf.extend_from_slice(record);
        if !self.blocked {
            self.write_pending(write);
        }
    }

    /// A write failed with `e`: `dropped` (whole lines) is lost; `from` is where it begins in
    /// `buf`. A notice among them is no lost line, and the lines it reported are unreported
    /// again.
    fn failed(&mut self, e: Errno, dropped: &[u8], from: usize) {
        let mut lines = count_lines(dropped);
        let mut bytes = dropped.len();
        if let Some((start, end, reported)) = self.notice {
            if start >= from {
                self.notice = None;
                self.unreported = self.unreported.saturating_add(reported);
                lines = lines.saturating_sub(1);
                bytes = bytes.saturating_sub(end - start);
            }
        }
        self.error = Some(e);
        self.lose(lines, bytes, describe(e));
    }

    /// Write what is pending, as far as the target takes it.
    pub(super) fn write_pending(&mut self, write: &mut impl FnMut(&[u8]) -> Result<usize, Errno>) {
        if self.pending() == 0 {
            self.blocked = false;
            return;
        }
        let (n, outcome) = write_some(write, &self.buf[self.head..]);
        self.head += n;
        if self.notice.is_some_and(|(_, end, _)| self.head >= end) {
            self.notice = None;
        }
        if n > 0 {
            self.error = None;
        }
        self.blocked = outcome == Outcome::Blocked;
        if let Outcome::Failed(e) = outcome {
            let keep = line_end(&self.buf, self.head);
            let dropped = std::mem::take(&mut self.buf);
            self.failed(e, &dropped[keep..], keep);
            self.buf = dropped;
            self.buf.truncate(keep);
        }
        self.compact();
    }

    pub(super) fn compact(&mut self) {
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
            // Back to a small buffer once a blocked sink has caught up.
            if self.buf.capacity() > 256 * 1024 {
                self.buf.shrink_to(64 * 1024);
            }
        } else if self.head >= self.buf.len() / 2 {
            // Keep the line begun whole in `buf`: `head` > 0 says that it was begun.
            let cut = line_start(&self.buf, self.head);
            self.buf.drain(..cut);
            if let Some((start, end, _)) = &mut self.notice {
                *start = start.saturating_sub(cut);
                *end -= cut;
            }
            self.head -= cut;
        }
    }

    /// Give up on what is pending (at stop): counted as lost. Returns the lines given up.
    pub(super) fn give_up(&mut self, reason: String) -> u64 {
        let rest = self.buf.split_off(self.head);
        let mut lines = count_lines(&rest);
        if self.notice.take().is_some() {
            lines = lines.saturating_sub(1);
        }
        self.lose(lines, rest.len(), reason);
        self.buf.clear();
        self.head = 0;
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted target: each write takes what the next step allows.
    struct Script {
        steps: Vec<Result<usize, Errno>>,
        written: Vec<u8>,
    }

    impl Script {
        fn new(steps: &[Result<usize, Errno>]) -> Script {
            Script {
                steps: steps.iter().rev().cloned().collect(),
                written: Vec::new(),
            }
        }

        fn write(&mut self, d: &[u8]) -> Result<usize, Errno> {
            // Past the script: the target takes everything.
            let n = self.steps.pop().unwrap_or(Ok(usize::MAX))?;
            let n = n.min(d.len());
            self.written.extend_from_slice(&d[..n]);
            Ok(n)
        }
    }

    fn notice(n: u64, why: &str) -> Vec<u8> {
        format!("LOST {n}: {why}\n").into_bytes()
    }

    #[test]
    fn a_partial_write_then_disk_full_keeps_the_line_whole_and_reports_the_loss() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Ok(4), Err(Errno::ENOSPC)]);
        out.commit(b"one\ntwo\nthree\n", false, &mut |d| t.write(d), notice);
        // "one" went out, "two" and "three" were lost.
        assert_eq!(t.written, b"one\n");
        assert_eq!((out.dropped_lines, out.pending()), (2, 0));
        assert_eq!(out.error, Some(Errno::ENOSPC));
        let mut t = Script::new(&[Ok(2), Err(Errno::ENOSPC)]);
        out.commit(b"four\nfive\n", false, &mut |d| t.write(d), notice);
        // The notice went first, cut short: its rest stays, "four" and "five" are lost.
        assert_eq!(t.written, b"LO");
        assert_eq!(out.dropped_lines, 4);
        assert_eq!(out.buf[out.head..], b"ST 2: no space left on device (ENOSPC)\n"[..]);
        assert_eq!(out.head, 2);
        let mut t = Script::new(&[]);
        out.commit(b"six\n", false, &mut |d| t.write(d), notice);
        assert_eq!(
            String::from_utf8(t.written.clone()).unwrap(),
            "ST 2: no space left on device (ENOSPC)\nLOST 2: no space left on device (ENOSPC)\nsix\n"
        );
        assert_eq!((out.dropped_lines, out.unreported, out.pending()), (4, 0, 0));
        assert_eq!(out.error, None);
    }

    #[test]
    fn the_rest_of_a_line_begun_is_kept_through_later_failures() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Ok(6), Err(Errno::ENOSPC)]);
        out.commit(b"one\ntwo\nthree\n", false, &mut |d| t.write(d), notice);
        assert_eq!(t.written, b"one\ntw");
        assert_eq!((out.dropped_lines, &out.buf[out.head..]), (1, &b"o\n"[..]));
        // Still failing: "o\n" stays (it finishes a line begun), the new lines are lost.
        let mut t = Script::new(&[Err(Errno::ENOSPC)]);
        out.commit(b"four\n", false, &mut |d| t.write(d), notice);
        assert_eq!((out.dropped_lines, &out.buf[out.head..]), (2, &b"o\n"[..]));
        let mut t = Script::new(&[Ok(1), Err(Errno::EAGAIN)]);
        out.commit(b"five\n", false, &mut |d| t.write(d), notice);
        assert_eq!(t.written, b"o");
        let mut t = Script::new(&[]);
        out.write_pending(&mut |d| t.write(d));
        assert_eq!(
            String::from_utf8(t.written).unwrap(),
            "\nLOST 2: no space left on device (ENOSPC)\nfive\n"
        );
    }

    #[test]
    fn a_notice_lost_again_is_not_counted_and_reports_all_later() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Err(Errno::ENOSPC)]);
        out.commit(b"a\nb\n", false, &mut |d| t.write(d), notice);
        let mut t = Script::new(&[Err(Errno::ENOSPC)]);
        out.commit(b"c\n", false, &mut |d| t.write(d), notice);
        assert_eq!((out.dropped_lines, out.unreported), (3, 3));
        let mut t = Script::new(&[]);
        out.commit(b"d\n", true, &mut |d| t.write(d), notice);
        assert_eq!(t.written, b"LOST 3: no space left on device (ENOSPC)\nd\n");
    }

    #[test]
    fn a_blocked_target_keeps_worker_lines_and_caps_the_masters() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Ok(2), Err(Errno::EAGAIN)]);
        let mut big = vec![b'x'; HARD_CAP - 10];
        big.push(b'\n');
        out.commit(b"begun\n", false, &mut |d| t.write(d), notice);
        assert!(out.blocked);
        let mut t = Script::new(&[Err(Errno::EAGAIN)]);
        out.commit(&big, false, &mut |d| t.write(d), notice);
        out.commit(b"own record\n", true, &mut |d| t.write(d), notice);
        assert_eq!(out.dropped_lines, 1, "the master's record past the cap is counted");
        out.commit(b"worker line\n", false, &mut |d| t.write(d), notice);
        assert_eq!(out.dropped_lines, 1, "worker lines are never dropped for want of room");
        let mut t = Script::new(&[]);
        t.written.extend_from_slice(b"be");
        out.write_pending(&mut |d| t.write(d));
        assert_eq!(out.pending(), 0);
        let text = String::from_utf8(t.written).unwrap();
        assert!(text.starts_with("begun\nxxx"), "{}", &text[..20]);
        // The loss is reported in its place, before the next record.
        assert!(
            text.ends_with("x\nLOST 1: the log did not take them (4194299 bytes were pending)\nworker line\n"),
            "{}",
            &text[text.len() - 100..]
        );
        assert_eq!((out.dropped_lines, out.unreported), (1, 0));
    }
}
