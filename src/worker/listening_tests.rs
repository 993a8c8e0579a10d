use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe, write, ForkResult, Pid};

use super::*;

#[test]
fn socket_links_are_parsed() {
    assert_eq!(socket_inode("socket:[123456]"), Some(123_456));
    assert_eq!(socket_inode("pipe:[123456]"), None);
    assert_eq!(socket_inode("socket:[12x]"), None);
    assert_eq!(socket_inode("anon_inode:[eventpoll]"), None);
}

#[test]
fn epoll_fdinfo_targets_are_hexadecimal_and_only_tfd_lines_count() {
    let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                tfd:        5 events:       19 data:                5  pos:0 ino:2a0f sdev:8\n\
                tfd:       11 events: 80000019 data:      7f1200000b  pos:0 ino:61 sdev:9\n";
    assert_eq!(epoll_targets(info).collect::<Vec<_>>(), vec![0x2a0f, 0x61]);
    assert_eq!(
        epoll_targets("tfd: 5 events: 19 data: 5 pos:0 ino:zz sdev:8\n").count(),
        0
    );
    assert_eq!(epoll_targets("").count(), 0);
}

#[test]
fn syscall_lines_are_parsed() {
    let s = parse_syscall("288 0x3 0x7ffd2a1c 0x7ffd2a18 0x80800 0x0 0x0 0x7ffd2a00 0x7f1234567890\n").unwrap();
    assert_eq!(s.nr, 288);
    assert_eq!(s.args, [3, 0x7ffd2a1c, 0x7ffd2a18, 0x80800, 0, 0]);
    assert_eq!(parse_syscall("running\n"), None);
    assert_eq!(parse_syscall("-1 0x7ffd2a00 0x7f1234567890\n"), None);
    assert_eq!(parse_syscall("7 0x1 0x2\n"), None);
    assert_eq!(parse_syscall(""), None);
}

#[test]
fn stat_lines_give_the_process_group_even_with_odd_names() {
    assert_eq!(stat_pgrp("4242 (python3) S 1 4240 4240 0 -1 4194560 1 0"), Some(4240));
    assert_eq!(stat_pgrp("4242 (a) b (c) S 17 99 98 0"), Some(99));
    assert_eq!(stat_pgrp("garbage"), None);
}

#[test]
fn pollfd_arrays_and_fd_sets_are_decoded() {
    let mut bytes = Vec::new();
    for (fd, events) in [
        (3i32, libc::POLLOUT),
        (7, libc::POLLIN),
        (-1, libc::POLLIN),
        (9, libc::POLLPRI),
    ] {
        bytes.extend_from_slice(&fd.to_ne_bytes());
        bytes.extend_from_slice(&events.to_ne_bytes());
        bytes.extend_from_slice(&0i16.to_ne_bytes());
    }
    assert_eq!(polled_fds(&bytes).collect::<Vec<_>>(), vec![7, 9]);
    // fd 3 and fd 70 set; the set read for nfds = 71 is 9 bytes long.
    let mut set = vec![0u8; 9];
    set[0] = 1 << 3;
    set[8] = 1 << 6;
    assert!(fd_isset(&set, 3) && fd_isset(&set, 70));
    assert!(!fd_isset(&set, 4) && !fd_isset(&set, 71) && !fd_isset(&set, 1000) && !fd_isset(&set, -1));
}

/// How the helper process waits once it is let go.
#[derive(Clone, Copy, Debug)]
enum Wait {
    Accept,
    Poll,
    Epoll,
    Select,
}

/// A helper process: blocks reading a pipe first (not listening), then, once a byte arrives,
/// waits on `listener` — renumbered to fd 100 first, since servers renumber — the `how` way.
/// With `in_child`, the helper is a child of a new process group leader, which itself only
/// sleeps. Returns (the pid to look at, the group leader, the pipe's write end).
fn helper(listener: &TcpListener, how: Wait, in_child: bool) -> (Pid, Pid, OwnedFd) {
    let (r, w) = pipe().unwrap();
    let (lfd, rfd) = (listener.as_raw_fd(), r.as_raw_fd());
    let wait = move || -> ! {
        // SAFETY: only async-signal-safe syscalls on fds and stack memory, then _exit.
        unsafe {
            let mut b = 0u8;
            libc::read(rfd, (&mut b as *mut u8).cast(), 1);
            libc::dup2(lfd, 100);
            libc::close(lfd);
            match how {
                Wait::Accept => {
                    libc::accept(100, std::ptr::null_mut(), std::ptr::null_mut());
                }
                Wait::Poll => {
                    let mut p = libc::pollfd {
                        fd: 100,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    libc::poll(&mut p, 1, -1);
                }
                Wait::Epoll => {
                    let ep = libc::epoll_create1(0);
                    let mut ev = libc::epoll_event {
                        events: libc::EPOLLIN as u32,
                        u64: 100,
                    };
                    libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, 100, &mut ev);
                    libc::close(100);
                    libc::epoll_wait(ep, &mut ev, 1, -1);
                }
                Wait::Select => {
                    let mut set: libc::fd_set = std::mem::zeroed();
                    libc::FD_SET(100, &mut set);
                    libc::select(
                        101,
                        &mut set,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    );
                }
            }
            libc::_exit(0)
        }
    };
    // SAFETY: the child makes only async-signal-safe calls (the closure above) and exits.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            if !in_child {
                wait();
            }
            // SAFETY: async-signal-safe calls only, as above.
            unsafe {
                libc::setpgid(0, 0);
                if libc::fork() == 0 {
                    wait();
                }
                libc::pause();
                libc::_exit(0)
            }
        }
        ForkResult::Parent { child } => {
            drop(r);
            let target = if in_child {
                // The grandchild: the leader's only child.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let kids = fs::read_to_string(format!("/proc/{child}/task/{child}/children")).unwrap_or_default();
                    if let Some(pid) = kids.split_whitespace().next() {
                        break Pid::from_raw(pid.parse().unwrap());
                    }
                    assert!(Instant::now() < deadline, "no grandchild");
                    std::thread::sleep(Duration::from_millis(5));
                }
            } else {
                child
            };
            (target, child, w)
        }
    }
}

/// Wait until `pid`'s main thread is blocked in syscall `nr`.
fn blocked_in(pid: Pid, nr: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()
        .and_then(|s| parse_syscall(&s))
        .map(|s| s.nr)
        != Some(nr)
    {
        assert!(Instant::now() < deadline, "pid {pid} never blocked in syscall {nr}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn seen_within(leader: Pid, cgroup: Option<&Path>, ino: u64) -> Seen {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = find(leader, cgroup, &[ino]) {
            return s;
        }
        assert!(Instant::now() < deadline, "never seen listening");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn end(leader: Pid, target: Pid) {
    let _ = killpg(leader, Signal::SIGKILL);
    let _ = kill(target, Signal::SIGKILL);
    let _ = waitpid(leader, None);
}

fn detects(how: Wait, kind: Kind, in_child: bool) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ino = inode_of(l.as_raw_fd()).unwrap();
    let (target, leader, w) = helper(&l, how, in_child);
    blocked_in(target, libc::SYS_read);
    assert_eq!(find(leader, None, &[ino]), None, "{how:?}: seen before it waits");
    write(&w, b"x").unwrap();
    let seen = seen_within(leader, None, ino);
    end(leader, target);
    assert_eq!(
        (seen.pid, seen.kind, seen.inode),
        (target.as_raw(), kind, ino),
        "{how:?}: {seen:?}"
    );
    if kind != Kind::Epoll {
        assert_eq!(seen.fd, 100, "{seen:?}");
    }
}

#[test]
fn a_process_blocked_in_accept_is_seen() {
    detects(Wait::Accept, Kind::Accept, false);
}

#[test]
fn a_process_blocked_in_poll_is_seen() {
    detects(Wait::Poll, Kind::Poll, false);
}

#[test]
fn a_process_with_the_listener_in_epoll_is_seen_even_after_closing_its_fd() {
    detects(Wait::Epoll, Kind::Epoll, false);
}

#[test]
fn a_process_blocked_in_select_is_seen() {
    detects(Wait::Select, Kind::Poll, false);
}

#[test]
fn a_child_in_the_workers_process_group_is_seen() {
    detects(Wait::Poll, Kind::Poll, true);
}

#[test]
fn a_process_in_the_workers_cgroup_is_seen_and_others_are_not() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ino = inode_of(l.as_raw_fd()).unwrap();
    let (target, leader, w) = helper(&l, Wait::Accept, true);
    blocked_in(target, libc::SYS_read);
    write(&w, b"x").unwrap();
    // A stand-in cgroup directory: only `cgroup.procs` is read.
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("cgroup.procs"), format!("{leader}\n")).unwrap();
    blocked_in(target, libc::SYS_accept);
    let outside = find(leader, Some(dir.path()), &[ino]);
    fs::write(dir.path().join("cgroup.procs"), format!("{leader}\n{target}\n")).unwrap();
    let seen = seen_within(leader, Some(dir.path()), ino);
    // Another listener's inode is never matched.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let not_ours = find(leader, Some(dir.path()), &[inode_of(other.as_raw_fd()).unwrap()]);
    end(leader, target);
    assert_eq!(outside, None);
    assert_eq!((seen.pid, seen.kind), (target.as_raw(), Kind::Accept));
    assert_eq!(not_ours, None);
}

#[test]
fn a_process_that_is_gone_is_not_seen_and_nothing_fails() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ino = inode_of(l.as_raw_fd()).unwrap();
    assert_eq!(find(Pid::from_raw(i32::MAX - 1), None, &[ino]), None);
    assert_eq!(find(Pid::this(), Some(Path::new("/nonexistent")), &[ino]), None);
    assert_eq!(find(Pid::this(), None, &[]), None);
    assert_eq!(read_memory(i32::MAX - 1, 0x1000, 8), None);
}
