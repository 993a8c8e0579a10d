//! Listening sockets: binding tcp and unix listeners, the unix socket file policy, and the
//! listener's lifetime.
//!
//! A [`Listener`] is created once and shared (`Rc`) by the master's current set and by every
//! worker that received it. The socket closes, and a unix socket file that this master created
//! is removed, when the last holder lets go: so a listener dropped from the config by a reload
//! stays open until the old workers that use it have gone, and a kept listener is the same
//! socket object for every generation.
//!
//! Unix socket file policy: a path that exists and is not a socket is never removed; a socket
//! file that somebody still listens on is "in use"; a socket file nobody listens on is stale and
//! replaced. On drop, the file is removed only if it is still the very inode this master bound.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    self, bind, listen, setsockopt, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
    UnixAddr,
};
use nix::sys::stat::{fchmodat, FchmodatFlags, Mode};
use nix::unistd::fchownat;

use crate::config::{ListenAddr, ListenConfig, SockOpts};
use crate::errno::describe;

/// The backlog of a worker's private probe listener: only the master connects to it.
pub const PROBE_BACKLOG: i32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener {name:?}: {op} {addr}: {}", describe(*errno))]
    Sys {
        name: String,
        op: &'static str,
        addr: String,
        errno: Errno,
    },
    #[error("listener {name:?}: {path} exists and is not a socket; refusing to remove it")]
    NotASocket { name: String, path: String },
    #[error("listener {name:?}: {path} is in use: another process listens on it")]
    InUse { name: String, path: String },
    #[error("listener {name:?}: {keys} changed; kept the socket as it was bound (these apply when an address is bound anew: a new address, or the next start)")]
    BindTime { name: String, keys: String },
    /// EADDRINUSE on a TCP bind, with who holds the port (portholder.rs).
    #[error("listener {name:?}: bind {addr}: {}; {holders}", describe(Errno::EADDRINUSE))]
    AddrInUse {
        name: String,
        addr: String,
        holders: String,
    },
}

/// A bound, listening socket.
pub struct Listener {
    fd: OwnedFd,
    addr: ListenAddr,
    /// The socket file this master created, with its identity, removed on drop.
    created: Option<(PathBuf, u64, u64)>,
    backlog: std::cell::Cell<i32>,
    /// The socket options in force (compared on reload; adopted and handed-over sockets take
    /// their config's).
    opts: std::cell::RefCell<SockOpts>,
    /// A port-only listener bound to `0.0.0.0` because IPv6 is unavailable.
    ipv4_fallback: bool,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Listener({} fd {})", self.addr, self.fd.as_raw_fd())
    }
}

impl Listener {
    /// Bind and listen according to `cfg`. The socket is close-on-exec, like every fd the
    /// master holds; only the spawn path hands it to workers.
    pub fn bind(cfg: &ListenConfig) -> Result<Listener, ListenError> {
        Listener::bind_with(cfg, false)
    }

    /// [`Listener::bind`], as if IPv6 were unavailable when `no_ipv6` (tests of the fallback).
    fn bind_with(cfg: &ListenConfig, no_ipv6: bool) -> Result<Listener, ListenError> {
        let sys = |op: &'static str, errno: Errno| ListenError::Sys {
            name: cfg.name.clone(),
            op,
            addr: cfg.addr.to_string(),
            errno,
        };
        let flags = SockFlag::SOCK_CLOEXEC;
        let ((fd, ipv4_fallback), created) = match &cfg.addr {
            ListenAddr::Tcp(sa) | ListenAddr::Udp(sa) => (bind_inet(cfg, sa, no_ipv6)?, None),
            ListenAddr::Abstract(name) => {
                let fd =
                    socket::socket(AddressFamily::Unix, SockType::Stream, flags, None).map_err(|e| sys("socket", e))?;
                let ua = UnixAddr::new_abstract(name.as_bytes()).map_err(|e| sys("address", e))?;
                bind(fd.as_raw_fd(), &ua).map_err(|e| sys("bind", e))?;
                ((fd, false), None)
            }
            ListenAddr::Unix(path) => {
                let fd =
                    socket::socket(AddressFamily::Unix, SockType::Stream, flags, None).map_err(|e| sys("socket", e))?;
                clear_stale(&cfg.name, path)?;
                let ua = UnixAddr::new(path.as_path()).map_err(|e| sys("address", e))?;
                bind(fd.as_raw_fd(), &ua).map_err(|e| sys("bind", e))?;
                let meta = std::fs::symlink_metadata(path).map_err(|e| sys("stat", io_errno(&e)))?;
                ((fd, false), Some((path.clone(), meta.dev(), meta.ino())))
            }
        };
        let l = Listener {
            fd,
            addr: cfg.addr.clone(),
            created,
            backlog: std::cell::Cell::new(cfg.backlog),
            opts: std::cell::RefCell::new(cfg.opts.clone()),
            ipv4_fallback,
        };
        l.apply_file_settings(cfg)?;
        l.apply_opts(cfg, None)?;
        if !matches!(cfg.addr, ListenAddr::Udp(_)) {
            listen(&l.fd, Backlog::new(cfg.backlog).unwrap_or(Backlog::MAXCONN)).map_err(|e| sys("listen", e))?;
        }
        Ok(l)
    }

    /// A worker's private probe listener (`[worker.probe]`): TCP on `127.0.0.1:0`, a small
    /// backlog, close-on-exec like every other; its [`Listener::addr`] is the port the kernel
    /// chose. It is left blocking: the open file description is shared with the worker, which
    /// may `accept` on it the blocking way (the master never accepts on it, it only connects
    /// to it and, for `tcp = true`, reads its accept queue with [`Listener::accept_queue`]).
    pub fn bind_probe(name: &str) -> Result<Listener, ListenError> {
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let sys = |op: &'static str, errno: Errno| ListenError::Sys {
            name: name.to_string(),
            op,
            addr: any.to_string(),
            errno,
        };
        let fd = socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| sys("socket", e))?;
        let std::net::SocketAddr::V4(v4) = any else {
            return Err(sys("bind", Errno::EAFNOSUPPORT));
        };
        bind(fd.as_raw_fd(), &SockaddrIn::from(v4)).map_err(|e| sys("bind", e))?;
        listen(&fd, Backlog::new(PROBE_BACKLOG).unwrap_or(Backlog::MAXCONN)).map_err(|e| sys("listen", e))?;
        let addr = bound_addr(&fd).ok_or_else(|| sys("getsockname", Errno::EINVAL))?;
        Ok(Listener {
            fd,
            addr,
            created: None,
            backlog: std::cell::Cell::new(PROBE_BACKLOG),
            opts: Default::default(),
            ipv4_fallback: false,
        })
    }

    /// Connections waiting in this listening TCP socket's accept queue: `tcpi_unacked` of
    /// `getsockopt(TCP_INFO)`, which for a socket in the LISTEN state is the queue's length.
    pub fn accept_queue(&self) -> Result<u32, Errno> {
        // SAFETY: tcp_info is plain data; zeroed is a valid value.
        let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
        // SAFETY: a valid pointer to `info` and its length, which the kernel fills at most.
        let r = unsafe {
            nix::libc::getsockopt(
                self.fd.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_INFO,
                (&mut info as *mut nix::libc::tcp_info).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(Errno::last());
        }
        Ok(info.tcpi_unacked)
    }

    /// What an upgrade hands to the next master image: the fd number and the identity.
    pub fn to_state(&self) -> (RawFd, ListenAddr, Option<(PathBuf, u64, u64)>, i32) {
        (
            self.raw_fd(),
            self.addr.clone(),
            self.created.clone(),
            self.backlog.get(),
        )
    }

    /// Take over a listener handed across an upgrade.
    pub fn from_state(fd: OwnedFd, addr: ListenAddr, created: Option<(PathBuf, u64, u64)>, backlog: i32) -> Listener {
        Listener {
            fd,
            addr,
            created,
            backlog: std::cell::Cell::new(backlog),
            opts: Default::default(),
            ipv4_fallback: false,
        }
    }

    /// Record the socket options an adopted or handed-over socket was bound with (its
    /// config's), for the comparison on the next reload.
    pub fn with_opts(self, opts: &SockOpts) -> Listener {
        *self.opts.borrow_mut() = opts.clone();
        self
    }

    /// Whether this port-only listener fell back to `0.0.0.0` because IPv6 is unavailable.
    pub fn ipv4_fallback(&self) -> bool {
        self.ipv4_fallback
    }

    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> String {
        match &self.addr {
            ListenAddr::Tcp(_) | ListenAddr::Udp(_) => {
                match socket::getsockname::<socket::SockaddrStorage>(self.fd.as_raw_fd()) {
                    Ok(ss) => ss.to_string(),
                    Err(_) => self.addr.to_string(),
                }
            }
            other => other.to_string(),
        }
    }

    /// Apply a reload's settings to a kept listener in place: unix mode and owner, backlog,
    /// the socket options that can change on a bound socket. `reuse_port`, `free_bind` and
    /// `ipv6_only` only take effect at bind: a change is an error (after the rest is applied).
    pub fn update(&self, cfg: &ListenConfig) -> Result<(), ListenError> {
        self.apply_file_settings(cfg)?;
        let old = self.opts.borrow().clone();
        self.apply_opts(cfg, Some(&old))?;
        let mut opts = cfg.opts.clone();
        (opts.reuse_port, opts.free_bind, opts.ipv6_only) = (old.reuse_port, old.free_bind, old.ipv6_only);
        *self.opts.borrow_mut() = opts;
        let fixed: Vec<&str> = [
            ("reuse_port", old.reuse_port != cfg.opts.reuse_port),
            ("free_bind", old.free_bind != cfg.opts.free_bind),
            ("ipv6_only", old.ipv6_only != cfg.opts.ipv6_only),
        ]
        .into_iter()
        .filter_map(|(k, c)| c.then_some(k))
        .collect();
        if !fixed.is_empty() {
            return Err(ListenError::BindTime {
                name: cfg.name.clone(),
                keys: fixed.join(", "),
            });
        }
        if cfg.backlog != self.backlog.get() && !matches!(cfg.addr, ListenAddr::Udp(_)) {
            listen(&self.fd, Backlog::new(cfg.backlog).unwrap_or(Backlog::MAXCONN)).map_err(|errno| {
                ListenError::Sys {
                    name: cfg.name.clone(),
                    op: "listen",
                    addr: cfg.addr.to_string(),
                    errno,
                }
            })?;
            self.backlog.set(cfg.backlog);
        }
        Ok(())
    }

    /// Set the options that apply after bind: all of them at bind (`old` none), else those that
    /// changed since `old`.
    fn apply_opts(&self, cfg: &ListenConfig, old: Option<&SockOpts>) -> Result<(), ListenError> {
        use nix::libc::{IPPROTO_TCP, SOL_SOCKET, SO_KEEPALIVE, SO_RCVBUF, SO_SNDBUF, TCP_DEFER_ACCEPT, TCP_NODELAY};
        let o = &cfg.opts;
        let changed = |f: fn(&SockOpts) -> i64| old.map_or(f(o) != f(&SockOpts::default()), |p| f(p) != f(o));
        let mut set = Vec::new();
        if matches!(cfg.addr, ListenAddr::Tcp(_)) {
            if changed(|o| o.keepalive as i64) {
                set.push(("SO_KEEPALIVE", SOL_SOCKET, SO_KEEPALIVE, o.keepalive as i32));
            }
            if changed(|o| o.nodelay as i64) {
                set.push(("TCP_NODELAY", IPPROTO_TCP, TCP_NODELAY, o.nodelay as i32));
            }
            if changed(|o| o.defer_accept as i64) {
                set.push(("TCP_DEFER_ACCEPT", IPPROTO_TCP, TCP_DEFER_ACCEPT, o.defer_accept as i32));
            }
        }
        // A buffer no longer configured keeps its size: the kernel's default is not known here.
        if let Some(n) = o
            .receive_buffer
            .filter(|_| changed(|o| o.receive_buffer.map_or(-1, i64::from)))
        {
            set.push(("SO_RCVBUF", SOL_SOCKET, SO_RCVBUF, n as i32));
        }
        if let Some(n) = o
            .send_buffer
            .filter(|_| changed(|o| o.send_buffer.map_or(-1, i64::from)))
        {
            set.push(("SO_SNDBUF", SOL_SOCKET, SO_SNDBUF, n as i32));
        }
        for (op, level, opt, value) in set {
            set_int(&self.fd, level, opt, value).map_err(|errno| ListenError::Sys {
                name: cfg.name.clone(),
                op,
                addr: cfg.addr.to_string(),
                errno,
            })?;
        }
        Ok(())
    }

    fn apply_file_settings(&self, cfg: &ListenConfig) -> Result<(), ListenError> {
        let ListenAddr::Unix(path) = &cfg.addr else {
            return Ok(());
        };
        let sys = |op: &'static str, errno: Errno| ListenError::Sys {
            name: cfg.name.clone(),
            op,
            addr: cfg.addr.to_string(),
            errno,
        };
        if let Some(mode) = cfg.mode {
            fchmodat(
                None,
                path.as_path(),
                Mode::from_bits_truncate(mode),
                FchmodatFlags::NoFollowSymlink,
            )
            .map_err(|e| sys("chmod", e))?;
        }
        if cfg.owner.is_some() || cfg.group.is_some() {
            fchownat(
                None,
                path.as_path(),
                cfg.owner,
                cfg.group,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| sys("chown", e))?;
        }
        Ok(())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.created {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.dev() == *dev && meta.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// An int socket option.
fn set_int(fd: &impl AsRawFd, level: i32, opt: i32, value: i32) -> Result<(), Errno> {
    // SAFETY: a pointer to an int and its size.
    let r = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as nix::libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Read an int socket option.
#[cfg(test)]
pub fn get_int(fd: &impl AsRawFd, level: i32, opt: i32) -> Result<i32, Errno> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as nix::libc::socklen_t;
    // SAFETY: a pointer to an int and its size, which the kernel fills at most.
    let r = unsafe { nix::libc::getsockopt(fd.as_raw_fd(), level, opt, (&mut value as *mut i32).cast(), &mut len) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(value)
}

/// The socket of a tcp or udp listener, bound, with the options that must come before bind;
/// and whether a port-only listener fell back to IPv4 (`no_ipv6` pretends IPv6 is missing).
fn bind_inet(cfg: &ListenConfig, sa: &std::net::SocketAddr, no_ipv6: bool) -> Result<(OwnedFd, bool), ListenError> {
    use nix::libc::{IPPROTO_IP, IPPROTO_IPV6, IPV6_FREEBIND, IPV6_V6ONLY, IP_FREEBIND, SOL_SOCKET, SO_REUSEPORT};
    let sys = |op: &'static str, errno: Errno| ListenError::Sys {
        name: cfg.name.clone(),
        op,
        addr: cfg.addr.to_string(),
        errno,
    };
    let udp = matches!(cfg.addr, ListenAddr::Udp(_));
    let ty = if udp { SockType::Datagram } else { SockType::Stream };
    let flags = SockFlag::SOCK_CLOEXEC;
    let mut sa = *sa;
    let mut fallback = false;
    let fd = if sa.is_ipv4() {
        socket::socket(AddressFamily::Inet, ty, flags, None)
    } else {
        let r = if no_ipv6 {
            Err(Errno::EAFNOSUPPORT)
        } else {
            socket::socket(AddressFamily::Inet6, ty, flags, None)
        };
        match r {
            Err(Errno::EAFNOSUPPORT) if cfg.opts.any_host && !cfg.opts.ipv6_only => {
                fallback = true;
                sa = std::net::SocketAddr::from(([0, 0, 0, 0], sa.port()));
                socket::socket(AddressFamily::Inet, ty, flags, None)
            }
            r => r,
        }
    }
    .map_err(|e| sys("socket", e))?;
    if !udp {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| sys("setsockopt SO_REUSEADDR", e))?;
    }
    if cfg.opts.reuse_port {
        set_int(&fd, SOL_SOCKET, SO_REUSEPORT, 1).map_err(|e| sys("setsockopt SO_REUSEPORT", e))?;
    }
    if sa.is_ipv6() {
        // Dual-stack unless ipv6_only, whatever net.ipv6.bindv6only says.
        set_int(&fd, IPPROTO_IPV6, IPV6_V6ONLY, cfg.opts.ipv6_only as i32)
            .map_err(|e| sys("setsockopt IPV6_V6ONLY", e))?;
    }
    if cfg.opts.free_bind {
        let r = if sa.is_ipv6() {
            set_int(&fd, IPPROTO_IPV6, IPV6_FREEBIND, 1)
        } else {
            set_int(&fd, IPPROTO_IP, IP_FREEBIND, 1)
        };
        r.map_err(|e| sys("setsockopt IP_FREEBIND", e))?;
    }
    let r = match sa {
        std::net::SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        std::net::SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    r.map_err(|e| match e {
        Errno::EADDRINUSE if !udp => ListenError::AddrInUse {
            name: cfg.name.clone(),
            addr: cfg.addr.to_string(),
            holders: crate::portholder::describe(&sa),
        },
        e => sys("bind", e),
    })?;
    Ok((fd, fallback))
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}

/// Make room for a unix socket at `path`: remove a stale socket file, refuse anything else.
fn clear_stale(name: &str, path: &Path) -> Result<(), ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ListenError::Sys {
                name: name.into(),
                op: "stat",
                addr: path.display().to_string(),
                errno: io_errno(&e),
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            name: name.into(),
            path: path.display().to_string(),
        });
    }
    if crate::sockfile::socket_is_live(path) {
        return Err(ListenError::InUse {
            name: name.into(),
            path: path.display().to_string(),
        });
    }
    std::fs::remove_file(path).map_err(|e| ListenError::Sys {
        name: name.into(),
        op: "unlink stale socket",
        addr: path.display().to_string(),
        errno: io_errno(&e),
    })
}

/// Sockets passed to the master itself by systemd (socket activation): the fds 3.. with their
/// names, if LISTEN_PID is this process. The variables are removed from the master's
/// environment once read, and the fds made close-on-exec like every other fd of the master.
///
/// Only listening stream sockets can be handed to workers as listeners: any other fd (a file,
/// a datagram socket, a socket that does not listen) is closed and reported in the second list,
/// one warning each; an fd number that is not open is skipped.
pub fn take_systemd_sockets() -> (Vec<(Option<String>, OwnedFd)>, Vec<String>) {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(String::from).collect())
        .unwrap_or_default();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let mut adopted = Vec::new();
    let mut refused = Vec::new();
    if !pid_ok || n <= 0 {
        return (adopted, refused);
    }
    // More than the fd table could hold is not a count systemd would pass.
    let n = n.min(65536);
    for i in 0..n {
        let fd = 3 + i;
        let name = names
            .get(i as usize)
            .cloned()
            .filter(|n| !n.is_empty() && n != "unknown");
        let label = format!("fd {fd} ({})", name.as_deref().unwrap_or("no name"));
        // Never take ownership of an fd number that is not open: closing it later could close
        // somebody else's fd.
        if let Err(e) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)) {
            refused.push(format!("LISTEN_FDS: {label}: fcntl F_SETFD: {}; skipped", describe(e)));
            continue;
        }
        // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process for it to own, and this
        // one is open.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        match check_listening(&owned) {
            Ok(()) => adopted.push((name, owned)),
            Err(why) => refused.push(format!("LISTEN_FDS: {label} {why}; closed")),
        }
    }
    (adopted, refused)
}

/// A listening stream socket, or a bound IP datagram socket (a `udp` listener), or why not.
fn check_listening(fd: &OwnedFd) -> Result<(), String> {
    match socket::getsockopt(fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(SockType::Datagram) => {
            return match bound_addr(fd) {
                Some(ListenAddr::Udp(a)) if a.port() != 0 => Ok(()),
                _ => Err("is a datagram socket not bound to an IP address and port".into()),
            }
        }
        Ok(other) => return Err(format!("is a {other:?} socket, not a stream or datagram socket")),
        Err(e) => return Err(format!("is not a socket: getsockopt SO_TYPE: {}", describe(e))),
    }
    match socket::getsockopt(fd, sockopt::AcceptConn) {
        Ok(true) => Ok(()),
        Ok(false) => Err("is a stream socket that does not listen".into()),
        Err(e) => Err(format!("getsockopt SO_ACCEPTCONN: {}", describe(e))),
    }
}

/// The address a socket is bound to, in config terms (an IP datagram socket is `udp`).
pub fn bound_addr(fd: &OwnedFd) -> Option<ListenAddr> {
    let ss: socket::SockaddrStorage = socket::getsockname(fd.as_raw_fd()).ok()?;
    let inet = |a: std::net::SocketAddr| match socket::getsockopt(fd, sockopt::SockType) {
        Ok(SockType::Datagram) => ListenAddr::Udp(a),
        _ => ListenAddr::Tcp(a),
    };
    if let Some(a) = ss.as_sockaddr_in() {
        return Some(inet(std::net::SocketAddr::V4(std::net::SocketAddrV4::from(*a))));
    }
    if let Some(a) = ss.as_sockaddr_in6() {
        return Some(inet(std::net::SocketAddr::V6(std::net::SocketAddrV6::from(*a))));
    }
    let u = ss.as_unix_addr()?;
    if let Some(p) = u.path() {
        return Some(ListenAddr::Unix(p.to_path_buf()));
    }
    u.as_abstract()
        .map(|a| ListenAddr::Abstract(String::from_utf8_lossy(a).into_owned()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use nix::libc::{
        IPPROTO_IP, IPPROTO_IPV6, IPPROTO_TCP, IPV6_FREEBIND, IPV6_V6ONLY, IP_FREEBIND, SOL_SOCKET, SO_KEEPALIVE,
        SO_RCVBUF, SO_REUSEPORT, SO_SNDBUF, TCP_DEFER_ACCEPT, TCP_NODELAY,
    };

    use super::*;

    /// The first `[[listen]]` of a config with `listen` as its body.
    fn cfg(listen: &str) -> ListenConfig {
        let text = format!("[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"a\"\n{listen}\n");
        crate::config::parse(Path::new("/tmp/t.toml"), &text)
            .unwrap()
            .listen
            .remove(0)
    }

    fn ipv6() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    fn port(l: &Listener) -> u16 {
        let ss: socket::SockaddrStorage = socket::getsockname(l.raw_fd()).unwrap();
        ss.as_sockaddr_in6()
            .map(|a| a.port())
            .or(ss.as_sockaddr_in().map(|a| a.port()))
            .unwrap()
    }

    #[test]
    fn a_port_alone_is_one_dual_stack_socket() {
        if !ipv6() {
            eprintln!("skipped: no IPv6 here");
            return;
        }
        for spec in ["tcp = \"0\"", "tcp = \"*:0\""] {
            let c = cfg(spec);
            assert_eq!(c.addr, ListenAddr::Tcp("[::]:0".parse().unwrap()));
            assert!(c.opts.any_host);
            let l = Listener::bind(&c).unwrap();
            assert!(!l.ipv4_fallback());
            assert_eq!(get_int(&l.fd, IPPROTO_IPV6, IPV6_V6ONLY), Ok(0));
            // IPv4 reaches it too.
            std::net::TcpStream::connect(("127.0.0.1", port(&l))).unwrap();
            std::net::TcpStream::connect(("::1", port(&l))).unwrap();
        }
    }

    #[test]
    fn a_port_alone_falls_back_to_ipv4_without_ipv6() {
        let l = Listener::bind_with(&cfg("tcp = \"0\""), true).unwrap();
        assert!(l.ipv4_fallback());
        assert!(l.local_addr().starts_with("0.0.0.0:"), "{}", l.local_addr());
        std::net::TcpStream::connect(("127.0.0.1", port(&l))).unwrap();
        // An explicit IPv6 address never falls back.
        assert!(Listener::bind_with(&cfg("tcp = \"[::]:0\""), true).is_err());
    }

    #[test]
    fn ipv6_only_reads_back() {
        if !ipv6() {
            eprintln!("skipped: no IPv6 here");
            return;
        }
        let l = Listener::bind(&cfg("tcp = \"[::]:0\"\nipv6_only = true")).unwrap();
        assert_eq!(get_int(&l.fd, IPPROTO_IPV6, IPV6_V6ONLY), Ok(1));
        assert!(std::net::TcpStream::connect(("127.0.0.1", port(&l))).is_err());
        let l = Listener::bind(&cfg("tcp = \"[::]:0\"\nipv6_only = false")).unwrap();
        assert_eq!(get_int(&l.fd, IPPROTO_IPV6, IPV6_V6ONLY), Ok(0));
        let l = Listener::bind(&cfg("udp = \"[::1]:0\"\nipv6_only = true\nfree_bind = true")).unwrap();
        assert_eq!(get_int(&l.fd, IPPROTO_IPV6, IPV6_V6ONLY), Ok(1));
        assert_eq!(get_int(&l.fd, IPPROTO_IPV6, IPV6_FREEBIND), Ok(1));
    }

    #[test]
    fn tcp_socket_options_read_back_and_accepted_sockets_inherit_keepalive_and_nodelay() {
        let c = cfg(
            "tcp = \"127.0.0.1:0\"\nreuse_port = true\nfree_bind = true\ndefer_accept = \"5s\"\nkeepalive = true\n\
             nodelay = true\nreceive_buffer = \"64KiB\"\nsend_buffer = \"32KiB\"",
        );
        let l = Listener::bind(&c).unwrap();
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_REUSEPORT), Ok(1));
        assert_eq!(get_int(&l.fd, IPPROTO_IP, IP_FREEBIND), Ok(1));
        // The kernel keeps the number of SYN-ACK retransmits that covers the time: 5 s reads
        // back as 7 (1 + 2 + 4).
        let defer = get_int(&l.fd, IPPROTO_TCP, TCP_DEFER_ACCEPT).unwrap();
        assert!((5..=8).contains(&defer), "TCP_DEFER_ACCEPT {defer}");
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_KEEPALIVE), Ok(1));
        assert_eq!(get_int(&l.fd, IPPROTO_TCP, TCP_NODELAY), Ok(1));
        // The kernel doubles the sizes (bookkeeping overhead).
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_RCVBUF), Ok(2 * 65536));
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_SNDBUF), Ok(2 * 32768));
        // With defer_accept, the connection is accepted once data arrives.
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port(&l))).unwrap();
        client.write_all(b"x").unwrap();
        let conn = socket::accept(l.raw_fd()).unwrap();
        // SAFETY: accept returned a new fd we own.
        let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) };
        assert_eq!(get_int(&conn, SOL_SOCKET, SO_KEEPALIVE), Ok(1));
        assert_eq!(get_int(&conn, IPPROTO_TCP, TCP_NODELAY), Ok(1));
        // Off by default.
        let plain = Listener::bind(&cfg("tcp = \"127.0.0.1:0\"")).unwrap();
        assert_eq!(get_int(&plain.fd, SOL_SOCKET, SO_REUSEPORT), Ok(0));
        assert_eq!(get_int(&plain.fd, SOL_SOCKET, SO_KEEPALIVE), Ok(0));
        assert_eq!(get_int(&plain.fd, IPPROTO_TCP, TCP_DEFER_ACCEPT), Ok(0));
    }

    #[test]
    fn free_bind_binds_an_address_this_host_does_not_have() {
        let l = Listener::bind(&cfg("tcp = \"192.0.2.1:0\"\nfree_bind = true")).unwrap();
        assert_eq!(get_int(&l.fd, IPPROTO_IP, IP_FREEBIND), Ok(1));
        assert!(Listener::bind(&cfg("tcp = \"192.0.2.1:0\"")).is_err());
    }

    #[test]
    fn a_udp_listener_is_a_bound_datagram_socket_that_receives() {
        let l = Listener::bind(&cfg(
            "udp = \"127.0.0.1:0\"\nreuse_port = true\nsend_buffer = \"16KiB\"",
        ))
        .unwrap();
        assert_eq!(socket::getsockopt(&l.fd, sockopt::SockType), Ok(SockType::Datagram));
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_REUSEPORT), Ok(1));
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_SNDBUF), Ok(2 * 16384));
        let p = port(&l);
        assert_eq!(
            bound_addr(&l.fd),
            Some(ListenAddr::Udp(format!("127.0.0.1:{p}").parse().unwrap()))
        );
        // What adoption from systemd accepts.
        assert_eq!(check_listening(&l.fd), Ok(()));
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"ping", ("127.0.0.1", p)).unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = socket::recvfrom::<socket::SockaddrStorage>(l.raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        // An unbound datagram socket is not.
        let fd = socket::socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap();
        assert!(check_listening(&fd).is_err());
    }

    #[test]
    fn a_reload_changes_options_in_place_but_not_the_bind_time_ones() {
        let l = Listener::bind(&cfg("tcp = \"127.0.0.1:0\"")).unwrap();
        let p = port(&l);
        let mut next = cfg(&format!(
            "tcp = \"127.0.0.1:{p}\"\nkeepalive = true\nnodelay = true\ndefer_accept = \"2s\""
        ));
        l.update(&next).unwrap();
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_KEEPALIVE), Ok(1));
        assert_eq!(get_int(&l.fd, IPPROTO_TCP, TCP_NODELAY), Ok(1));
        assert!(get_int(&l.fd, IPPROTO_TCP, TCP_DEFER_ACCEPT).unwrap() >= 2);
        next.opts.keepalive = false;
        next.opts.reuse_port = true;
        let e = l.update(&next).unwrap_err().to_string();
        assert!(e.contains("reuse_port"), "{e}");
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_KEEPALIVE), Ok(0), "the rest applied");
        assert_eq!(get_int(&l.fd, SOL_SOCKET, SO_REUSEPORT), Ok(0));
    }
}
