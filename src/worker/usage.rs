//! What a worker's processes use: their resident memory, for `max_rss` and `status`.
//!
//! A worker is every process of its cgroup (`cgroup.procs`), or, without cgroups, of its
//! process group. Its memory is the sum of their resident set sizes (`/proc/PID/statm`):
//! pages shared between them (a pre-forking server's copy-on-write pages) count once per
//! process, as `ps` and most supervisors count them — an upper bound, cheap to read (one small
//! file per process).

use std::path::Path;

use nix::unistd::Pid;

/// The pids of the worker led by `leader`.
pub fn members(leader: Pid, cgroup: Option<&Path>) -> Vec<i32> {
    let from_cgroup = cgroup.and_then(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok());
    match from_cgroup {
        Some(procs) => procs.lines().filter_map(|l| l.trim().parse().ok()).collect(),
        None => crate::worker::listening::group_members(leader.as_raw()),
    }
}

/// Resident bytes of the worker led by `leader` (0 if nothing can be read).
pub fn rss_bytes(leader: Pid, cgroup: Option<&Path>) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    members(leader, cgroup)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/statm")).ok())
        .filter_map(|statm| resident_pages(&statm))
        .sum::<u64>()
        .saturating_mul(page)
}

/// The resident pages (second field) of a `/proc/PID/statm` line.
pub fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_second_field_is_resident() {
        assert_eq!(resident_pages("5000 1234 300 10 0 800 0\n"), Some(1234));
        assert_eq!(resident_pages("5000"), None);
    }

    #[test]
    fn our_own_memory_is_counted() {
        let me = Pid::this();
        // Not a process group leader, probably: count ourselves through a fake cgroup file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), format!("{me}\n")).unwrap();
        let rss = rss_bytes(me, Some(dir.path()));
        assert!(rss > 1 << 20, "{rss}");
    }
}
