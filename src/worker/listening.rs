//! Is a worker waiting for connections on one of its listeners? (`ready = "listening"`)
//!
//! Most servers never send `READY=1` (uvicorn, hypercorn, lighttpd, node, Go's net/http,
//! puma, …), but every server, once it is ready, waits for connections on the listening
//! sockets it inherited. The kernel shows that wait in /proc, so the master can see it from
//! outside, without the server's help.
//!
//! Theory of operation. The master passes a worker its listeners and knows their socket
//! inodes (`fstat`; the same number `/proc/PID/fd/N` shows as `socket:[INODE]`). Servers `dup`
//! and renumber fds, so a listener is always recognised by inode, never by fd number. The
//! processes of a worker are every pid in its cgroup's `cgroup.procs` when it has a cgroup,
//! else every process whose process group is the worker's pid (its own process group: a
//! `/proc/*/stat` scan, done only when the worker itself is not seen waiting). A process is
//! waiting on a listener when any of these holds:
//!
//! - **epoll**: one of its epoll fds (`anon_inode:[eventpoll]`) has a listener registered:
//!   `/proc/PID/fdinfo/EPFD` has a line `tfd: N events: … ino:HEX …` whose inode (hexadecimal)
//!   is a listener's. Every event-loop server (libuv, Go's netpoller, asyncio, lighttpd,
//!   nginx-style C servers) registers its listener once it is about to accept; a thread
//!   blocked in `epoll_wait`/`epoll_pwait` needs no other check.
//! - **accept**: a thread (`/proc/PID/task/TID/syscall`) is blocked in `accept`/`accept4` on an
//!   fd that is a listener (the blocking, thread-per-connection servers).
//! - **poll/select**: a thread is blocked in `poll`/`ppoll`/`select`/`pselect6` (aarch64 has
//!   only `ppoll`/`pselect6`) and its fd set, read from the process's memory
//!   (`process_vm_readv`: the master is the worker's parent or subreaper, root or the same
//!   uid), asks for input on a listener fd (Ruby's `IO.select`, puma, Python's `selectors`
//!   with poll/select).
//!
//! What it cannot see: io_uring (an `IORING_OP_ACCEPT` or a poll request leaves no trace in
//! /proc), a server that accepts only in a thread blocked on something else (a condition
//! variable, a pipe it hands the listener over later), a listener registered with epoll in a
//! process that is not in the worker's cgroup or process group, and processes the master may
//! not inspect (a non-dumpable worker under another uid: `EPERM`). Those stay "not seen" until
//! `start_timeout`; `ready = "auto"` still takes `READY=1` from them.
//!
//! The checks are snapshots of racing state: a process may exit, a thread may leave its
//! syscall, memory may be unmapped between two reads. Every error — process gone, `EPERM`,
//! a short read, text that does not parse — means "not seen (yet)": nothing here panics,
//! blocks or retries; the caller looks again later. A `poll` array read just after the thread
//! returned can be stale; it was waiting on the listener a moment before, which is what
//! readiness means anyway.

use std::collections::BTreeMap;
use std::fs;
use std::io::IoSliceMut;
use std::os::fd::RawFd;
use std::path::Path;

use nix::libc;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

/// At most this many `pollfd`s or `fd_set` bits are read from a process (the array is read in
/// one `process_vm_readv`; a bigger one is looked at only up to here).
const MAX_POLL_FDS: u64 = 65_536;

/// How the wait was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Epoll,
    Accept,
    Poll,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Epoll => "epoll",
            Kind::Accept => "accept",
            Kind::Poll => "poll",
        }
    }
}

/// The evidence that a worker listens: which process, how, on which fd and listener inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub pid: i32,
    pub kind: Kind,
    /// The syscall a thread was blocked in (`accept4`, `ppoll`, …) or `epoll_ctl` for a
    /// registration.
    pub syscall: &'static str,
    /// The fd in that process: the epoll fd, or the listener fd waited on.
    pub fd: i32,
    pub inode: u64,
}

/// The socket inode of an fd (`fstat`), as `/proc/PID/fd/N` shows it: `socket:[INODE]`.
pub fn inode_of(fd: RawFd) -> Result<u64, nix::errno::Errno> {
    nix::sys::stat::fstat(fd).map(|st| st.st_ino)
}

/// Look for a process of the worker `leader` waiting on one of `inodes`, sorted (each of the
/// worker's fds is looked up in them: with 1,000 listeners, a linear search made a look
/// quadratic). `cgroup` is the worker's own cgroup directory, when it has one.
pub fn find(leader: Pid, cgroup: Option<&Path>, inodes: &[u64]) -> Option<Seen> {
    if inodes.is_empty() {
        return None;
    }
    match cgroup {
        Some(dir) => {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
            // The leader first: it is the one that listens, most of the time.
            let mut pids = std::iter::once(leader.as_raw()).chain(
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .filter(|&p| p != leader.as_raw()),
            );
            pids.find_map(|pid| in_process(pid, inodes))
        }
        None => in_process(leader.as_raw(), inodes).or_else(|| {
            group_members(leader.as_raw())
                .into_iter()
                .filter(|&p| p != leader.as_raw())
                .find_map(|pid| in_process(pid, inodes))
        }),
    }
}

/// Every process in process group `pgid`, from a scan of `/proc/*/stat`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_pgrp(&s))
                == Some(pgid)
        })
        .collect()
}

/// The process group (field 5) of a `/proc/PID/stat` line. The command (field 2) is in
/// parentheses and may itself contain spaces and parentheses: parse after the last `)`.
pub fn stat_pgrp(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp
    rest.split_ascii_whitespace().nth(2)?.parse().ok()
}

/// One process: its listener fds and epoll fds, then its threads' blocking syscalls.
fn in_process(pid: i32, inodes: &[u64]) -> Option<Seen> {
    let fd_dir = format!("/proc/{pid}/fd");
    let mut listeners: BTreeMap<i32, u64> = BTreeMap::new();
    let mut epolls: Vec<i32> = Vec::new();
    for entry in fs::read_dir(&fd_dir).ok()?.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(link) = fs::read_link(entry.path()) else {
            continue;
        };
        let Some(link) = link.to_str() else { continue };
        if let Some(ino) = socket_inode(link).filter(|i| inodes.binary_search(i).is_ok()) {
            listeners.insert(fd, ino);
        } else if link == "anon_inode:[eventpoll]" {
            epolls.push(fd);
        }
    }
    // A registration outlives the fd it was made with while the socket stays open elsewhere
    // (the master holds it): epoll fds are looked at even without a listener fd.
    for epfd in epolls {
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{epfd}")) else {
            continue;
        };
        let found = epoll_targets(&info).find(|i| inodes.binary_search(i).is_ok());
        if let Some(inode) = found {
            return Some(Seen {
                pid,
                kind: Kind::Epoll,
                syscall: "epoll_ctl",
                fd: epfd,
                inode,
            });
        }
    }
    if listeners.is_empty() {
        return None;
    }
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("syscall")) else {
            continue;
        };
        let Some(call) = parse_syscall(&text) else {
            continue;
        };
        if let Some(seen) = waits_on(pid, &call, &listeners) {
            return Some(seen);
        }
    }
    None
}

/// The inode of a `/proc/PID/fd/N` link `socket:[INODE]`.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The inodes of the files registered with an epoll fd, from its fdinfo:
/// `tfd:        5 events:       19 data:                5  pos:0 ino:2a0f sdev:8` (the inode
/// in hexadecimal, fs/eventpoll.c `ep_show_fdinfo`).
pub fn epoll_targets(fdinfo: &str) -> impl Iterator<Item = u64> + '_ {
    fdinfo
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| l.split_ascii_whitespace().find_map(|w| w.strip_prefix("ino:")))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
}

/// A thread's current syscall from `/proc/PID/task/TID/syscall`: `NR ARG1 … ARG6 SP PC` (the
/// number in decimal, the rest `0x…`); `running` or `-1 SP PC` (not in a syscall) are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syscall {
    pub nr: i64,
    pub args: [u64; 6],
}

pub fn parse_syscall(text: &str) -> Option<Syscall> {
    let mut words = text.split_ascii_whitespace();
    let nr: i64 = words.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(words.next()?.strip_prefix("0x")?, 16).ok()?;
    }
    Some(Syscall { nr, args })
}

/// The syscalls a thread waits for connections in, by number, for this build's architecture.
fn wait_syscall(nr: i64) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        match nr {
            libc::SYS_poll => return Some("poll"),
            libc::SYS_select => return Some("select"),
            _ => {}
        }
    }
    match nr {
        libc::SYS_accept => Some("accept"),
        libc::SYS_accept4 => Some("accept4"),
        libc::SYS_ppoll => Some("ppoll"),
        libc::SYS_pselect6 => Some("pselect6"),
        _ => None,
    }
}

/// Whether a thread in `call` waits on one of `listeners` (fd → inode, of process `pid`).
fn waits_on(pid: i32, call: &Syscall, listeners: &BTreeMap<i32, u64>) -> Option<Seen> {
    let name = wait_syscall(call.nr)?;
    let seen = |kind, fd: i32| {
        Some(Seen {
            pid,
            kind,
            syscall: name,
            fd,
            inode: *listeners.get(&fd)?,
        })
    };
    match name {
        "accept" | "accept4" => seen(Kind::Accept, i32::try_from(call.args[0]).ok()?),
        "poll" | "ppoll" => {
            let n = call.args[1].min(MAX_POLL_FDS) as usize;
            let bytes = read_memory(pid, call.args[0], n * std::mem::size_of::<libc::pollfd>())?;
            let fd = polled_fds(&bytes).find(|fd| listeners.contains_key(fd))?;
            seen(Kind::Poll, fd)
        }
        _ => {
            // select, pselect6: (nfds, readfds, …)
            let nfds = call.args[0].min(MAX_POLL_FDS);
            if call.args[1] == 0 || nfds == 0 {
                return None;
            }
            let bytes = read_memory(pid, call.args[1], nfds.div_ceil(8) as usize)?;
            let fd = *listeners.keys().find(|&&fd| fd_isset(&bytes, fd))?;
            seen(Kind::Poll, fd)
        }
    }
}

/// The fds of a `struct pollfd` array (native layout: `int fd; short events; short revents`)
/// that ask for input.
pub fn polled_fds(bytes: &[u8]) -> impl Iterator<Item = i32> + '_ {
    bytes.chunks_exact(std::mem::size_of::<libc::pollfd>()).filter_map(|c| {
        let fd = i32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        let events = i16::from_ne_bytes([c[4], c[5]]);
        (fd >= 0 && events & (libc::POLLIN | libc::POLLPRI) != 0).then_some(fd)
    })
}

/// Whether `fd` is set in an `fd_set` (an array of `unsigned long`, bit `fd % BITS` of word
/// `fd / BITS`): byte `fd / 8`, bit `fd % 8` on a little-endian machine, which both supported
/// architectures are.
pub fn fd_isset(bytes: &[u8], fd: i32) -> bool {
    let Ok(fd) = usize::try_from(fd) else { return false };
    let word = std::mem::size_of::<libc::c_ulong>();
    let (w, bit) = (fd / (8 * word), fd % (8 * word));
    let Some(chunk) = bytes.get(w * word..(w + 1) * word).or_else(|| bytes.get(w * word..)) else {
        return false;
    };
    let mut buf = [0u8; 8];
    buf[..chunk.len()].copy_from_slice(chunk);
    u64::from_ne_bytes(buf) >> bit & 1 == 1
}

/// Read `len` bytes at `addr` in process `pid`; a short or failed read is `None`.
fn read_memory(pid: i32, addr: u64, len: usize) -> Option<Vec<u8>> {
    if len == 0 || addr == 0 {
        return None;
    }
    let mut buf = vec![0u8; len];
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).ok()?,
        len,
    }];
    let n = process_vm_readv(Pid::from_raw(pid), &mut [IoSliceMut::new(&mut buf)], &remote).ok()?;
    (n == len).then_some(buf)
}

#[cfg(test)]
#[path = "listening_tests.rs"]
mod tests;
