//! `[master] metrics`: OpenMetrics text served from the master's own poll loop.
//!
//! Theory of operation. The master binds one more listening socket (tcp, unix path or
//! abstract; never passed to workers) and polls it with everything else; there is no thread
//! and no timer, so a master nobody scrapes does exactly what it did without metrics (an idle
//! master still never wakes). A scrape is accepted, its request read, the text rendered from
//! what the master holds at that moment — the generations machine's counters, its workers, the
//! log's counters, and `/proc/self` for memory and fds — written, and the connection closed
//! ([`server`]). Each connection has a deadline from its accept, and the loop serves a bounded
//! number at once; the rest wait in the listen backlog.
//!
//! [`text`] writes the OpenMetrics 1.0 text format; this module knows nothing of the master:
//! `master/metrics.rs` chooses the metrics (docs/metrics.md lists them).

pub mod server;
pub mod text;

pub use server::{Asked, MetricsConn, MetricsServer};
pub use text::{Histogram, Labels, Text, CONTENT_TYPE};

/// The master's resident memory in bytes (`/proc/self/statm`, resident pages × page size).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf with a valid name has no preconditions.
    let page = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    Some(pages.saturating_mul(u64::try_from(page).ok()?))
}

/// The master's open fds (`/proc/self/fd`), not counting the one that lists them.
pub fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_self_reads() {
        assert!(super::resident_bytes().unwrap() > 0);
        // stdin, stdout, stderr at least (other tests open and close fds meanwhile).
        assert!(super::open_fds().unwrap() >= 3);
    }
}
