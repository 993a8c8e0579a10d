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

use crate::config::{ListenAddr, ListenConfig};
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
        let sys = |op: &'static str, errno: Errno| ListenError::Sys {
            name: cfg.name.clone(),
            op,
            addr: cfg.addr.to_string(),
            errno,
        };
        let flags = SockFlag::SOCK_CLOEXEC;
        let (fd, created) = match &cfg.addr {
            ListenAddr::Tcp(sa) => {
                let family = if sa.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let fd = socket::socket(family, SockType::Stream, flags, None).map_err(|e| sys("socket", e))?;
                setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| sys("setsockopt SO_REUSEADDR", e))?;
                let r = match sa {
                    std::net::SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(*a)),
                    std::net::SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(*a)),
                };
                r.map_err(|e| match e {
                    Errno::EADDRINUSE => ListenError::AddrInUse {
                        name: cfg.name.clone(),
                        addr: cfg.addr.to_string(),
                        holders: crate::portholder::describe(sa),
                    },
                    e => sys("bind", e),
                })?;
                (fd, None)
            }
            ListenAddr::Abstract(name) => {
                let fd =
                    socket::socket(AddressFamily::Unix, SockType::Stream, flags, None).map_err(|e| sys("socket", e))?;
                let ua = UnixAddr::new_abstract(name.as_bytes()).map_err(|e| sys("address", e))?;
                bind(fd.as_raw_fd(), &ua).map_err(|e| sys("bind", e))?;
                (fd, None)
            }
            ListenAddr::Unix(path) => {
                let fd =
                    socket::socket(AddressFamily::Unix, SockType::Stream, flags, None).map_err(|e| sys("socket", e))?;
                clear_stale(&cfg.name, path)?;
                let ua = UnixAddr::new(path.as_path()).map_err(|e| sys("address", e))?;
                bind(fd.as_raw_fd(), &ua).map_err(|e| sys("bind", e))?;
                let meta = std::fs::symlink_metadata(path).map_err(|e| sys("stat", io_errno(&e)))?;
                (fd, Some((path.clone(), meta.dev(), meta.ino())))
            }
        };
        let l = Listener {
            fd,
            addr: cfg.addr.clone(),
            created,
            backlog: std::cell::Cell::new(cfg.backlog),
        };
        l.apply_file_settings(cfg)?;
        listen(&l.fd, Backlog::new(cfg.backlog).unwrap_or(Backlog::MAXCONN)).map_err(|e| sys("listen", e))?;
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
        }
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
            ListenAddr::Tcp(_) => match socket::getsockname::<socket::SockaddrStorage>(self.fd.as_raw_fd()) {
                Ok(ss) => ss.to_string(),
                Err(_) => self.addr.to_string(),
            },
            other => other.to_string(),
        }
    }

    /// Apply a reload's settings to a kept listener in place: unix mode and owner, backlog.
    pub fn update(&self, cfg: &ListenConfig) -> Result<(), ListenError> {
        self.apply_file_settings(cfg)?;
        if cfg.backlog != self.backlog.get() {
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

/// A listening stream socket, or why not.
fn check_listening(fd: &OwnedFd) -> Result<(), String> {
    match socket::getsockopt(fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(other) => return Err(format!("is a {other:?} socket, not a stream socket")),
        Err(e) => return Err(format!("is not a socket: getsockopt SO_TYPE: {}", describe(e))),
    }
    match socket::getsockopt(fd, sockopt::AcceptConn) {
        Ok(true) => Ok(()),
        Ok(false) => Err("is a stream socket that does not listen".into()),
        Err(e) => Err(format!("getsockopt SO_ACCEPTCONN: {}", describe(e))),
    }
}

/// The address a socket is bound to, in config terms.
pub fn bound_addr(fd: &OwnedFd) -> Option<ListenAddr> {
    let ss: socket::SockaddrStorage = socket::getsockname(fd.as_raw_fd()).ok()?;
    if let Some(a) = ss.as_sockaddr_in() {
        return Some(ListenAddr::Tcp(std::net::SocketAddr::V4(std::net::SocketAddrV4::from(
            *a,
        ))));
    }
    if let Some(a) = ss.as_sockaddr_in6() {
        return Some(ListenAddr::Tcp(std::net::SocketAddr::V6(std::net::SocketAddrV6::from(
            *a,
        ))));
    }
    let u = ss.as_unix_addr()?;
    if let Some(p) = u.path() {
        return Some(ListenAddr::Unix(p.to_path_buf()));
    }
    u.as_abstract()
        .map(|a| ListenAddr::Abstract(String::from_utf8_lossy(a).into_owned()))
}
