//! Socket files: whether somebody listens on one, and removing only the file we created.
//!
//! The master binds unix sockets at paths (its control and notify sockets, unix listeners).
//! It replaces a socket file only when nobody listens on it, and at exit removes only the file
//! it bound (the same device and inode), never one somebody put in its place.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{connect, AddressFamily, SockFlag, SockType, UnixAddr};

/// Whether some process holds the unix socket file at `path`: a stream connect succeeds (or
/// finds the backlog full), or is refused for the socket's type (EPROTOTYPE: a datagram socket
/// somebody has bound). Only ECONNREFUSED (nobody bound it) and ENOENT mean it is free; any
/// other answer (EACCES, …) counts as live, so that nothing is removed on a guess.
pub fn socket_is_live(path: &Path) -> bool {
    let Ok(fd) = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) else {
        return false;
    };
    let Ok(ua) = UnixAddr::new(path) else { return false };
    // A full backlog answers EAGAIN, which still means somebody listens.
    !matches!(connect(fd.as_raw_fd(), &ua), Err(Errno::ECONNREFUSED | Errno::ENOENT))
}

/// The identity of the file at `path` now, without following a symbolic link.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Remove `path` only if it is still the file `id` names: never a file somebody else put there.
pub fn remove_if_same(path: &Path, id: Option<(u64, u64)>) {
    if id.is_some() && file_id(path) == id {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether `path` is a socket file (not following a symbolic link).
pub fn path_is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
