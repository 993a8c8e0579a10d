//! What validation checks against the host rather than the text, and how deep it goes
//! ([`Checks`]): the worker's program resolves and is executable, `cwd` is a directory, rlimits
//! can be granted, the log can be opened, the runtime directory is trusted. Also the look-ups
//! of users and groups by name or id, and the helpers the spawn path shares (`find_program`).

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::resource::Resource;
use nix::unistd::{Gid, Group, Uid, User};

use super::{cut, shown, WorkerConfig, MAX_SHOWN};

/// How far validation goes beyond the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Checks {
    /// The text alone: what an upgraded master re-reads (its running state, not the host as it
    /// is now, is the truth then), and what the fuzzer drives.
    Text,
    /// Also the worker's settings against the host (program, cwd, rlimits): a reload.
    Reload,
    /// Also the master's own files (log, runtime directory): `check` and `start`.
    Start,
}

/// Resolve a worker's program as execvp would: a name with a '/' is a path (relative to the
/// worker's cwd), anything else is looked up in `path_var` (default
/// `/usr/local/bin:/usr/bin:/bin`). Shared by the spawn path and by validation.
pub fn find_program(program: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path_var)
        .map(|dir| dir.join(program))
        .find(|candidate| nix::unistd::access(candidate, nix::unistd::AccessFlags::X_OK).is_ok() && candidate.is_file())
}

/// A user as errors name it: `uid 65534 (nobody)`.
fn user_text(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Whether `dir` may hold this master's pid file and sockets: owned by root or by us, and
/// writable by nobody else (no group or other write bit, sticky or not: in a shared directory
/// another user can plant the names before we do). A symbolic link is followed only if root or
/// we own it too. Used by `check` and again by `start` right after creating the directory.
pub fn check_runtime_dir(dir: &Path) -> Result<(), String> {
    let me = Uid::effective().as_raw();
    let trusted = |uid: u32| uid == me || uid == 0;
    let stat = |follow: bool| {
        let m = if follow {
            std::fs::metadata(dir)
        } else {
            std::fs::symlink_metadata(dir)
        };
        m.map_err(|e| {
            format!(
                "runtime directory {}: stat: {}",
                dir.display(),
                crate::errno::describe_io(&e)
            )
        })
    };
    let link = stat(false)?;
    if link.file_type().is_symlink() && !trusted(link.uid()) {
        return Err(format!(
            "runtime directory {} is a symbolic link owned by {}, not by root or {}; refusing to use it",
            dir.display(),
            user_text(link.uid()),
            user_text(me)
        ));
    }
    let m = stat(true)?;
    let mode = m.permissions().mode() & 0o7777;
    if !m.is_dir() {
        return Err(format!("runtime directory {} is not a directory", dir.display()));
    }
    if !trusted(m.uid()) {
        return Err(format!(
            "runtime directory {} is owned by {} (mode {mode:04o}), not by root or {}; refusing to use it",
            dir.display(),
            user_text(m.uid()),
            user_text(me)
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "runtime directory {} is writable by others (owner {}, mode {mode:04o}); refusing to use it: \
             give zdd a directory of its own, mode 0700 or 0755",
            dir.display(),
            user_text(m.uid())
        ));
    }
    Ok(())
}

fn limit_text(v: u64) -> String {
    if v == nix::libc::RLIM_INFINITY {
        "infinity".into()
    } else {
        v.to_string()
    }
}

pub(super) fn lookup_user(name: &str) -> Result<User, String> {
    let found = match name.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(name),
    };
    match found {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(format!("no such user {}", shown(name))),
        Err(e) => Err(format!(
            "looking up user {}: {}",
            shown(name),
            crate::errno::describe(e)
        )),
    }
}

pub(super) fn lookup_group(name: &str) -> Result<Gid, String> {
    let found = match name.parse::<u32>() {
        Ok(n) => Group::from_gid(Gid::from_raw(n)),
        Err(_) => Group::from_name(name),
    };
    match found {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("no such group {}", shown(name))),
        Err(e) => Err(format!(
            "looking up group {}: {}",
            shown(name),
            crate::errno::describe(e)
        )),
    }
}

/// The log file can be opened: not a directory, in a directory that exists.
pub(super) fn check_log_path(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{} is a directory; name a file in it", path.display()));
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(format!("{} is not a directory", dir.display())),
            Err(e) => Err(format!(
                "directory {}: {}",
                dir.display(),
                crate::errno::describe_io(&e)
            )),
        },
        None => Ok(()),
    }
}

pub(super) fn check_cwd(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(e) => Err(format!("{}: {}", dir.display(), crate::errno::describe_io(&e))),
    }
}

/// The worker's program as the spawn path will find it (the worker's own PATH if its env sets
/// one, else the master's) is an executable file. `dir` anchors a relative path with a '/'.
pub(super) fn check_program(program: &str, env: &[(String, String)], dir: Option<&Path>) -> Result<(), String> {
    let path_var: Option<OsString> = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("PATH"));
    let Some(found) = find_program(program, path_var.as_deref()) else {
        return Err(format!(
            "{} not found in PATH ({})",
            shown(program),
            cut(&path_var.unwrap_or_default().to_string_lossy(), MAX_SHOWN * 4)
        ));
    };
    let full = match dir {
        Some(d) if found.is_relative() => d.join(&found),
        _ => found,
    };
    let m = std::fs::metadata(&full).map_err(|e| format!("{}: {}", full.display(), crate::errno::describe_io(&e)))?;
    if !m.is_file() {
        return Err(format!("{} is not a regular file", full.display()));
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o111 == 0 || nix::unistd::access(&full, nix::unistd::AccessFlags::X_OK).is_err() {
        return Err(format!("{} is not executable (mode {mode:04o})", full.display()));
    }
    Ok(())
}

/// The worker can be given this hard limit. It sets its limits after dropping privileges, so
/// only a worker that runs as root under a root master can raise one above the master's own;
/// and no process gets more open files than the kernel's fs.nr_open. Judged against the limits
/// of the process doing the check (`zdd check` inherits them from the same place `start` does).
pub(super) fn check_rlimit(resource: Resource, hard: u64, worker: &WorkerConfig) -> Result<(), String> {
    if resource == Resource::RLIMIT_NOFILE {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(max) = nr_open.filter(|max| hard > *max) {
            return Err(format!(
                "{} is above the kernel's maximum of open files per process (fs.nr_open = {max})",
                limit_text(hard)
            ));
        }
    }
    let Ok((_, own_hard)) = nix::sys::resource::getrlimit(resource) else {
        return Ok(());
    };
    let worker_uid = worker.credentials.as_ref().map_or_else(Uid::effective, |c| c.uid);
    if hard > own_hard && !(Uid::effective().is_root() && worker_uid.is_root()) {
        return Err(format!(
            "hard limit {} is above zdd's own hard limit {}, and only a worker running as root \
             could raise it (workers set their limits after dropping privileges)",
            limit_text(hard),
            limit_text(own_hard)
        ));
    }
    Ok(())
}

pub(super) const RLIMIT_NAMES: &[(&str, Resource)] = &[
    ("as", Resource::RLIMIT_AS),
    ("core", Resource::RLIMIT_CORE),
    ("cpu", Resource::RLIMIT_CPU),
    ("data", Resource::RLIMIT_DATA),
    ("fsize", Resource::RLIMIT_FSIZE),
    ("locks", Resource::RLIMIT_LOCKS),
    ("memlock", Resource::RLIMIT_MEMLOCK),
    ("msgqueue", Resource::RLIMIT_MSGQUEUE),
    ("nice", Resource::RLIMIT_NICE),
    ("nofile", Resource::RLIMIT_NOFILE),
    ("nproc", Resource::RLIMIT_NPROC),
    ("rss", Resource::RLIMIT_RSS),
    ("rtprio", Resource::RLIMIT_RTPRIO),
    ("rttime", Resource::RLIMIT_RTTIME),
    ("sigpending", Resource::RLIMIT_SIGPENDING),
    ("stack", Resource::RLIMIT_STACK),
];

pub(crate) fn rlimit_resource(name: &str) -> Option<(Resource, &'static str)> {
    let lower = name.to_ascii_lowercase();
    let lower = lower.strip_prefix("rlimit_").unwrap_or(&lower);
    RLIMIT_NAMES.iter().find(|(n, _)| *n == lower).map(|(n, r)| (*r, *n))
}

/// `/run/zdd` as root; otherwise `$XDG_RUNTIME_DIR/zdd`, else `/tmp/zdd-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    if Uid::effective().is_root() {
        return PathBuf::from("/run/zdd");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("zdd"),
        _ => PathBuf::from(format!("/tmp/zdd-{}", Uid::effective())),
    }
}
