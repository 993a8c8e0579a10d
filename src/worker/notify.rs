//! The sd_notify protocol: the master's own NOTIFY_SOCKET, which its workers write to.
//!
//! One unix datagram socket, with SO_PASSCRED, so that every message arrives with the sender's
//! pid (SCM_CREDENTIALS) and the master can attribute it to a worker: the worker itself, or any
//! process in the worker's process group (so `systemd-notify --ready` run by a shell worker
//! counts). `systemd-notify` waits for a BARRIER=1 acknowledgement: it passes a pipe fd, and
//! the receiver answers by closing it. Received fds are held until the whole batch has been
//! handled, so the sender is still alive (and its process group known) while we attribute it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use nix::unistd::Pid;

use crate::errno::describe;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify socket {path}: {op}: {}", describe(*errno))]
    Sys {
        path: String,
        op: &'static str,
        errno: Errno,
    },
    #[error("notify socket {0} exists and is not a socket; refusing to remove it")]
    NotASocket(String),
    #[error("already running? notify socket {0} is in use by a live process; refusing to replace it")]
    InUse(String),
}

/// One datagram: its sender and its `KEY=VALUE` assignments.
#[derive(Debug)]
pub struct Message {
    pub pid: Pid,
    pub fields: Vec<(String, String)>,
    /// Fds passed along (BARRIER=1): closing them acknowledges the message.
    pub _fds: Vec<OwnedFd>,
}

impl Message {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Split a notify datagram into assignments; lines without `=` are ignored, as sd_notify does.
pub fn parse(payload: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(payload)
        .split('\n')
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Notify messages read per turn of the master's loop.
pub const RECEIVE_BATCH: usize = 64;

pub struct NotifyServer {
    fd: OwnedFd,
    path: PathBuf,
    /// The socket file's (dev, ino) as bound: removed at drop only while it is still that file.
    file: Option<(u64, u64)>,
}

impl NotifyServer {
    /// Bind the socket at `path`. A socket file there is replaced only if no process has it
    /// bound (a dead master's: a datagram socket somebody holds answers a connect with
    /// EPROTOTYPE, a dead one with ECONNREFUSED); anything else is refused.
    pub fn bind(path: &Path, owner: Option<nix::unistd::Uid>) -> Result<NotifyServer, NotifyError> {
        let sys = |op: &'static str| {
            move |errno: Errno| NotifyError::Sys {
                path: path.display().to_string(),
                op,
                errno,
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if crate::sockfile::socket_is_live(path) {
                    return Err(NotifyError::InUse(path.display().to_string()));
                }
                std::fs::remove_file(path).map_err(|e| sys("unlink")(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?
            }
            Ok(_) => return Err(NotifyError::NotASocket(path.display().to_string())),
            Err(_) => {}
        }
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(sys("socket"))?;
        setsockopt(&fd, sockopt::PassCred, &true).map_err(sys("setsockopt SO_PASSCRED"))?;
        // Let big bursts of status messages queue rather than be dropped by senders.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        let addr = UnixAddr::new(path).map_err(sys("address"))?;
        bind(fd.as_raw_fd(), &addr).map_err(sys("bind"))?;
        let server = NotifyServer {
            fd,
            path: path.to_path_buf(),
            file: crate::sockfile::file_id(path),
        };
        // Workers may run as another user; only they (and root) may write to it.
        nix::sys::stat::fchmodat(
            None,
            path,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(sys("chmod"))?;
        server.set_owner(owner)?;
        Ok(server)
    }

    /// Take over the socket handed across an upgrade. The file at `path` is taken to be the
    /// one the previous image bound: the master held it across the exec.
    pub fn from_fd(fd: OwnedFd, path: &Path) -> NotifyServer {
        let file = std::fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .and(crate::sockfile::file_id(path));
        NotifyServer {
            fd,
            path: path.to_path_buf(),
            file,
        }
    }

    /// Give the socket file to the workers' user, so that they can write to it.
    pub fn set_owner(&self, owner: Option<nix::unistd::Uid>) -> Result<(), NotifyError> {
        let uid = owner.unwrap_or_else(nix::unistd::Uid::effective);
        nix::unistd::fchownat(
            None,
            self.path.as_path(),
            Some(uid),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|errno| NotifyError::Sys {
            path: self.path.display().to_string(),
            op: "chown",
            errno,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Read the queued datagrams, at most [`RECEIVE_BATCH`] per call: a worker flooding the
    /// socket cannot grow the master's memory or keep it from its other work; the rest wait
    /// in the socket's receive buffer (bounded by the kernel) for the next turn of the loop.
    pub fn receive(&self) -> Vec<Message> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..RECEIVE_BATCH {
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 16]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            };
            let len = msg.bytes;
            let mut pid = None;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::ScmCredentials(cred) => pid = Some(Pid::from_raw(cred.pid())),
                        ControlMessageOwned::ScmRights(rights) => {
                            // SAFETY: the kernel just installed these fds in our table for us.
                            fds.extend(rights.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
                        }
                        _ => {}
                    }
                }
            }
            if let Some(pid) = pid {
                out.push(Message {
                    pid,
                    fields: parse(&buf[..len]),
                    _fds: fds,
                });
            }
        }
        out
    }
}

impl Drop for NotifyServer {
    fn drop(&mut self) {
        crate::sockfile::remove_if_same(&self.path, self.file);
    }
}

/// The client side: the master telling systemd about itself (Type=notify / notify-reload),
/// when it was started with NOTIFY_SOCKET (a path, or `@name` for the abstract namespace).
pub struct SystemdNotifier {
    fd: OwnedFd,
    addr: UnixAddr,
}

impl SystemdNotifier {
    /// From the master's own environment; None when not run by systemd.
    pub fn from_env() -> Option<SystemdNotifier> {
        let raw = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(raw.as_os_str());
        let addr = match bytes.first()? {
            b'@' => UnixAddr::new_abstract(&bytes[1..]).ok()?,
            b'/' => UnixAddr::new(Path::new(&raw)).ok()?,
            _ => return None,
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .ok()?;
        Some(SystemdNotifier { fd, addr })
    }

    /// Send one message; systemd being away is not the master's problem.
    pub fn send(&self, message: &str) {
        let _ = nix::sys::socket::sendto(self.fd.as_raw_fd(), message.as_bytes(), &self.addr, MsgFlags::empty());
    }

    /// Send one message with `fds` attached (SCM_RIGHTS), for systemd's fd store: the kernel
    /// gives systemd its own copies, ours stay open. The socket is non-blocking: EAGAIN means
    /// systemd's queue is full and the message should be sent again later.
    pub fn send_with_fds(&self, message: &str, fds: &[RawFd]) -> Result<(), Errno> {
        let iov = [std::io::IoSlice::new(message.as_bytes())];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let sent = loop {
            match sendmsg(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), Some(&self.addr)) {
                Err(Errno::EINTR) => continue,
                r => break r?,
            }
        };
        // A datagram goes whole or not at all; anything else is not a message systemd read.
        if sent != message.len() {
            return Err(Errno::EMSGSIZE);
        }
        Ok(())
    }
}

/// Whether systemd takes `name` as an `FDNAME=` (its `fdname_is_valid`): at most 255
/// characters, printable ASCII, no ':' (the separator of `LISTEN_FDNAMES`). An empty name is
/// refused here too: systemd would pass it back as no name at all.
pub fn valid_fdname(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b':')
}

/// The message that puts the fds sent with it into systemd's fd store under `name`. No
/// `FDPOLL=0`: systemd then drops a stored socket that reports POLLHUP or POLLERR (one that no
/// longer works), which a listening socket does only once it is shut down.
pub fn fdstore_message(name: &str) -> String {
    format!("FDSTORE=1\nFDNAME={name}")
}

/// The message that makes systemd close every fd it stores under `name`.
pub fn fdstore_remove_message(name: &str) -> String {
    format!("FDSTOREREMOVE=1\nFDNAME={name}")
}

/// `FileDescriptorStoreMax=` of the master's unit, from `$FDSTORE` (systemd 254 and later set
/// it when the store is enabled); None when unknown (older systemd, or no store).
pub fn fdstore_max_from_env() -> Option<usize> {
    std::env::var("FDSTORE").ok()?.trim().parse().ok()
}

/// CLOCK_MONOTONIC in microseconds, for `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_assignments() {
        let f = parse(b"READY=1\nSTATUS=serving 3 requests\ngarbage\nMAINPID=42\n");
        assert_eq!(
            f,
            vec![
                ("READY".into(), "1".into()),
                ("STATUS".into(), "serving 3 requests".into()),
                ("MAINPID".into(), "42".into())
            ]
        );
    }

    #[test]
    fn fdstore_messages_name_the_listener() {
        assert_eq!(fdstore_message("http"), "FDSTORE=1\nFDNAME=http");
        assert_eq!(fdstore_remove_message("api v2"), "FDSTOREREMOVE=1\nFDNAME=api v2");
        let parsed = parse(fdstore_message("http").as_bytes());
        assert_eq!(
            parsed,
            vec![("FDSTORE".into(), "1".into()), ("FDNAME".into(), "http".into())]
        );
    }

    #[test]
    fn fdnames_follow_systemds_rules() {
        assert!(valid_fdname("http"));
        assert!(valid_fdname("a b-c_d.e~"));
        assert!(valid_fdname(&"x".repeat(255)));
        assert!(!valid_fdname(&"x".repeat(256)));
        assert!(!valid_fdname(""));
        assert!(!valid_fdname("a:b"));
        assert!(!valid_fdname("a\nb"));
        assert!(!valid_fdname("a\x7fb"));
        assert!(!valid_fdname("caf\u{e9}"));
    }

    /// One datagram per store request, the fd attached as SCM_RIGHTS: systemd's side (and
    /// tests/fdstore.rs, which plays it) receives a copy of the very socket.
    #[test]
    fn sends_fds_with_the_message() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("systemd.sock");
        let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let notifier = SystemdNotifier {
            fd: socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap(),
            addr: UnixAddr::new(&path).unwrap(),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        notifier
            .send_with_fds(&fdstore_message("http"), &[listener.as_raw_fd()])
            .unwrap();
        let mut buf = [0u8; 256];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            systemd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel installed these fds for us.
                fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let len = msg.bytes;
        assert_eq!(&buf[..len], b"FDSTORE=1\nFDNAME=http");
        assert_eq!(fds.len(), 1);
        let ino = |fd: RawFd| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        assert_eq!(ino(fds[0].as_raw_fd()), ino(listener.as_raw_fd()), "the same socket");
        // Without fds: a plain message.
        notifier.send_with_fds(&fdstore_remove_message("http"), &[]).unwrap();
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"FDSTOREREMOVE=1\nFDNAME=http");
    }

    #[test]
    fn receives_with_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let server = NotifyServer::bind(&path, None).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1\nSTATUS=hi", &path).unwrap();
        let msgs = server.receive();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].pid, nix::unistd::getpid());
        assert_eq!(msgs[0].get("READY"), Some("1"));
        assert_eq!(msgs[0].get("STATUS"), Some("hi"));
        drop(server);
        assert!(!path.exists());
    }
}
