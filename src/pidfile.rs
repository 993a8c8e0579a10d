//! The pid file and its lock.
//!
//! The pid file is both a record and a mutex: the master holds an exclusive `flock` on it for
//! its whole life (the lock belongs to the open file, so it survives the master's re-exec). A
//! second master on the same config finds it locked and fails with "already running, pid N"; a
//! pid file left by a master that died is unlocked, and simply taken over.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::errno::{describe, describe_io};

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("already running, pid {pid} (pid file {path} is locked)")]
    AlreadyRunning { pid: String, path: String },
    #[error("pid file {path}: {op}: {msg}")]
    Io {
        path: String,
        op: &'static str,
        msg: String,
    },
}

pub struct PidFile {
    file: File,
    path: PathBuf,
    ino: u64,
}

/// Create the directory that holds a runtime file (pid file, sockets) if it is missing, and
/// make sure it is one we can trust (`config::check_runtime_dir`): owned by root or us, writable
/// by nobody else. It is checked after creating it too, since in a shared place (`/tmp`)
/// somebody else may have made it first. A new directory is 0700, or 0755 for a root master,
/// whose workers may run as another user and must reach the notify socket in it.
pub fn ensure_parent(path: &Path) -> std::io::Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        let mode = if nix::unistd::Uid::effective().is_root() {
            0o755
        } else {
            0o700
        };
        std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    }
    crate::config::check_runtime_dir(dir).map_err(std::io::Error::other)
}

impl PidFile {
    /// Take the lock and write our pid.
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        let io = |op: &'static str| {
            move |e: std::io::Error| PidFileError::Io {
                path: path.display().to_string(),
                op,
                msg: describe_io(&e),
            }
        };
        ensure_parent(path).map_err(io("runtime directory"))?;
        // Never through a symbolic link: whoever planted one would have us overwrite its target.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(nix::libc::ELOOP) => PidFileError::Io {
                    path: path.display().to_string(),
                    op: "open",
                    msg: "it is a symbolic link; refusing to follow it (ELOOP)".into(),
                },
                _ => io("open")(e),
            })?;
        // Only a regular file with no other name: a hard link to somebody's file is not ours.
        let meta = file.metadata().map_err(io("stat"))?;
        if !meta.file_type().is_file() || meta.nlink() > 1 {
            return Err(PidFileError::Io {
                path: path.display().to_string(),
                op: "open",
                msg: format!(
                    "not a regular file of its own ({} link(s)); refusing to write to it",
                    meta.nlink()
                ),
            });
        }
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) } != 0 {
            let errno = Errno::last();
            if errno == Errno::EWOULDBLOCK {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(PidFileError::AlreadyRunning {
                    pid: if pid.is_empty() { "unknown".into() } else { pid.into() },
                    path: path.display().to_string(),
                });
            }
            return Err(PidFileError::Io {
                path: path.display().to_string(),
                op: "flock",
                msg: describe(errno),
            });
        }
        file.set_len(0).map_err(io("truncate"))?;
        file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        writeln!(file, "{}", std::process::id()).map_err(io("write"))?;
        let ino = file.metadata().map_err(io("stat"))?.ino();
        Ok(PidFile {
            file,
            path: path.to_path_buf(),
            ino,
        })
    }
}

impl PidFile {
    /// What an upgrade hands over: the locked file's fd, path and inode.
    pub fn to_state(&self) -> (RawFd, PathBuf, u64) {
        (self.file.as_raw_fd(), self.path.clone(), self.ino)
    }

    /// Take over the locked pid file after an upgrade (the lock belongs to the open file,
    /// which exec keeps).
    pub fn from_state(fd: std::os::fd::OwnedFd, path: PathBuf, ino: u64) -> PidFile {
        PidFile {
            file: File::from(fd),
            path,
            ino,
        }
    }

    /// Write the current pid again (after daemonizing, which changes it).
    pub fn rewrite(&mut self) -> Result<(), PidFileError> {
        let io = |op: &'static str| {
            let path = self.path.display().to_string();
            move |e: std::io::Error| PidFileError::Io {
                path,
                op,
                msg: describe_io(&e),
            }
        };
        self.file.set_len(0).map_err(io("truncate"))?;
        self.file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        writeln!(self.file, "{}", std::process::id()).map_err(io("write"))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Remove the file only while it is still ours, and while we still hold the lock.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_reports_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/app.pid");
        let first = PidFile::acquire(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        let err = PidFile::acquire(&path).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!("already running, pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(!path.exists());
        let again = PidFile::acquire(&path).unwrap();
        drop(again);
    }
}
