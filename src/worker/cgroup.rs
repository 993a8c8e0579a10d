//! A cgroup v2 per worker, so that every process a worker starts ends with it.
//!
//! A worker's descendants can leave its process group (`setsid`, a daemonizing server, a
//! double fork): `killpg` no longer reaches them, and if they hold the listening socket the port
//! black-holes connections after `zdd stop` and the next start fails with EADDRINUSE. Only a
//! cgroup contains them all, whatever they do.
//!
//! Theory of operation.
//!
//! - Where: the cgroup2 mount is found in /proc/self/mountinfo (at /sys/fs/cgroup on a unified
//!   host, /sys/fs/cgroup/unified on a hybrid one), the master's own cgroup in the `0::` line of
//!   /proc/self/cgroup. The master creates `<its cgroup>/zdd-<pid>-<random>` (the pid is for
//!   people; the random part keeps masters apart whose pids collide, each pid 1 in its own pid
//!   namespace) and, for each worker, `zdd-…/w-<generation>-<slot>-<n>`. No controller is ever enabled, so the cgroup v2 rule
//!   "no processes in a cgroup whose children have controllers" does not apply, and the master
//!   may stay where it is: in the service's cgroup under systemd with `Delegate=yes`, or
//!   wherever root started it.
//! - Joining: the master opens the worker cgroup's `cgroup.procs` before fork; the child writes
//!   "0" into it between fork and exec (one `write`, async-signal-safe), so the worker is
//!   contained before it runs a single instruction of its own.
//! - Killing: wherever a worker's process group gets SIGKILL (stop timeout, start timeout, a
//!   failed reload, the master's second stop signal), `cgroup.kill` is written too; when the
//!   worker is reaped its cgroup is killed, since nothing of a worker may outlive it. An empty
//!   cgroup is removed at once; one whose processes are still dying is watched (`cgroup.events`,
//!   POLLPRI, in the master's poll set) and removed once `populated 0`: no blocking wait.
//! - At stop the whole `zdd-…` tree is killed and removed (a bounded wait: the master is
//!   exiting and every worker has been reaped already).
//! - A master that dies uncleanly (SIGKILL) cannot clean up. Its tree's path is recorded beside
//!   the pid file (`<pid_file>.cgroup`); the next start, once it holds the pid-file lock (so no
//!   master of this config lives), kills what is left in that tree and waits for it to be gone
//!   before binding. Workers that ignore the parent-death SIGTERM, and descendants that escaped,
//!   cannot keep the port past the next start.
//! - Where no cgroup can be created (no cgroup2 mount, not root and not delegated, a read-only
//!   cgroupfs), the master says so once at start and falls back to the process group.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use slog::{info, warn, Logger};

use crate::errno::{describe, describe_io};

/// How long start-up and the final stop wait for killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A worker's own cgroup (a directory of the cgroup2 filesystem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCgroup {
    path: PathBuf,
}

impl WorkerCgroup {
    /// One handed over by an upgrade.
    pub fn from_path(path: PathBuf) -> WorkerCgroup {
        WorkerCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, opened close-on-exec for the child to write "0" into after fork.
    pub fn open_procs(&self) -> Result<OwnedFd, Errno> {
        open_fd(&self.path.join("cgroup.procs"), OFlag::O_WRONLY | OFlag::O_CLOEXEC)
    }

    /// SIGKILL to every process in it. An empty or already removed cgroup is not an error.
    pub fn kill(&self) {
        let _ = kill_tree(&self.path);
    }
}

/// What an upgrade hands to the next image: the tree, the counter and the cgroups still
/// waiting to be removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandOver {
    pub root: PathBuf,
    pub record: Option<PathBuf>,
    pub next: u64,
    pub pending: Vec<PathBuf>,
}

/// A killed worker cgroup whose processes are still dying.
struct Pending {
    path: PathBuf,
    events: OwnedFd,
}

/// The master's cgroups: `zdd-<pid>-<random>` and the worker cgroups in it.
pub struct Cgroups {
    log: Logger,
    /// `<the master's cgroup>/zdd-<pid>-<random>`; None where cgroups are unavailable.
    root: Option<PathBuf>,
    /// `<pid_file>.cgroup`, naming `root` for the next start after a crash.
    record: Option<PathBuf>,
    next: u64,
    pending: Vec<Pending>,
}

/// Where the master records its cgroup tree: beside the pid file.
pub fn record_path(pid_file: &Path) -> PathBuf {
    let mut s = pid_file.as_os_str().to_os_string();
    s.push(".cgroup");
    PathBuf::from(s)
}

impl Cgroups {
    /// No cgroups (yet): before `start`, or in a master that never runs.
    pub fn none(log: &Logger) -> Cgroups {
        Cgroups {
            log: log.clone(),
            root: None,
            record: None,
            next: 0,
            pending: Vec::new(),
        }
    }

    /// At start, in the process that will be the master (after any daemonizing fork): create
    /// `zdd-<pid>-<random>` and record it beside the pid file; or say once why workers are not contained.
    pub fn start(log: &Logger, pid_file: &Path) -> Cgroups {
        let mut c = Cgroups::none(log);
        match create_root() {
            Ok(root) => {
                let record = record_path(pid_file);
                match write_record(&record, &root) {
                    Ok(()) => c.record = Some(record),
                    Err(e) => {
                        warn!(log, "could not record the workers' cgroup; after a crash of the master the next start cannot kill what is left in it";
                        "file" => record.display().to_string(), "error" => e)
                    }
                }
                info!(log, "workers run in cgroups"; "cgroup" => root.display().to_string());
                c.root = Some(root);
            }
            Err(reason) => warn!(
                log,
                "cgroups unavailable ({}): a worker's descendants that leave its process group are not contained",
                reason
            ),
        }
        c
    }

    /// In the new image after an upgrade: the tree the old image handed over, or a new one if
    /// it had none (an older zdd).
    pub fn resume(log: &Logger, handed: Option<HandOver>, pid_file: &Path) -> Cgroups {
        let Some(h) = handed.filter(|h| h.root.is_dir()) else {
            return Cgroups::start(log, pid_file);
        };
        let mut c = Cgroups::none(log);
        c.root = Some(h.root);
        c.record = h.record;
        c.next = h.next;
        for path in h.pending {
            c.watch(path);
        }
        c
    }

    pub fn handover(&self) -> Option<HandOver> {
        self.root.as_ref().map(|root| HandOver {
            root: root.clone(),
            record: self.record.clone(),
            next: self.next,
            pending: self.pending.iter().map(|p| p.path.clone()).collect(),
        })
    }

    /// A new cgroup for a worker about to be spawned; None (the process group only) where
    /// cgroups are unavailable or this one cannot be created.
    pub fn create(&mut self, generation: u64, slot: usize) -> Option<WorkerCgroup> {
        let root = self.root.as_ref()?;
        self.next += 1;
        let path = root.join(format!("w-{generation}-{slot}-{}", self.next));
        match nix::unistd::mkdir(&path, Mode::from_bits_truncate(0o755)) {
            Ok(()) => Some(WorkerCgroup { path }),
            Err(e) => {
                warn!(self.log, "could not create the worker's cgroup; it runs contained by its process group only";
                    "cgroup" => path.display().to_string(), "error" => format!("mkdir: {}", describe(e)));
                None
            }
        }
    }

    /// The worker is gone (reaped, or never started): kill whatever is left in its cgroup and
    /// remove it, now if it is empty, else once its last process is gone (see `service`).
    pub fn release(&mut self, cg: WorkerCgroup) {
        cg.kill();
        match rmdir(&cg.path) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EBUSY) => self.watch(cg.path),
            Err(e) => warn!(self.log, "could not remove a worker's cgroup";
                "cgroup" => cg.path.display().to_string(), "error" => format!("rmdir: {}", describe(e))),
        }
    }

    fn watch(&mut self, path: PathBuf) {
        match open_fd(&path.join("cgroup.events"), OFlag::O_RDONLY | OFlag::O_CLOEXEC) {
            Ok(events) => self.pending.push(Pending { path, events }),
            Err(Errno::ENOENT) => {}
            Err(e) => warn!(self.log, "cannot watch a killed worker's cgroup; it stays until the master stops";
                "cgroup" => path.display().to_string(), "error" => format!("open cgroup.events: {}", describe(e))),
        }
    }

    /// The `cgroup.events` of cgroups waiting to be empty: poll them for POLLPRI.
    pub fn poll_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.pending.iter().map(|p| p.events.as_raw_fd())
    }

    /// Remove the watched cgroups that have become empty. Reading `cgroup.events` also re-arms
    /// its POLLPRI, so a cgroup that is still populated does not wake the loop again.
    pub fn service(&mut self) {
        let log = &self.log;
        self.pending.retain(|p| {
            if populated(&p.events).unwrap_or(true) {
                return true;
            }
            match rmdir(&p.path) {
                Ok(()) | Err(Errno::ENOENT) => false,
                Err(Errno::EBUSY) => true,
                Err(e) => {
                    warn!(log, "could not remove a worker's cgroup";
                        "cgroup" => p.path.display().to_string(), "error" => format!("rmdir: {}", describe(e)));
                    false
                }
            }
        });
    }

    /// At the master's stop, every worker reaped: kill what is left anywhere in the tree, wait
    /// (bounded) for it to be gone, remove the tree and the record.
    pub fn shutdown(&mut self) {
        self.pending.clear();
        let Some(root) = self.root.take() else { return };
        let _ = kill_tree(&root);
        if !wait_empty(&root, KILL_WAIT) {
            warn!(self.log, "processes of the workers' cgroup survived SIGKILL; the cgroup is left behind";
                "cgroup" => root.display().to_string(), "waited_secs" => KILL_WAIT.as_secs());
        }
        if let Err(e) = remove_tree(&root) {
            warn!(self.log, "could not remove the workers' cgroup"; "cgroup" => root.display().to_string(), "error" => e);
        }
        if let Some(record) = self.record.take() {
            let _ = std::fs::remove_file(record);
        }
    }
}

/// At start, holding the pid-file lock (so no master of this config is alive): kill and
/// remove what a master that died uncleanly left in its cgroup tree, and wait until it is
/// gone, so that the ports it held are free before we bind them.
pub fn clean_stale(log: &Logger, pid_file: &Path) {
    let record = record_path(pid_file);
    let text = match std::fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(log, "cannot read the cgroup record of the previous master"; "file" => record.display().to_string(), "error" => describe_io(&e));
            return;
        }
    };
    let path = PathBuf::from(text.trim_end_matches('\n'));
    let forget = || {
        let _ = std::fs::remove_file(&record);
    };
    if !is_tree_name(&path) {
        warn!(log, "the cgroup record of the previous master names no zdd cgroup; ignored"; "file" => record.display().to_string());
        return forget();
    }
    if !is_cgroup2(&path) {
        // Removed already (the master stopped cleanly after all, or a reboot).
        return forget();
    }
    // The name is unique (random), the record is this config's, and its lock is ours: the
    // master that created the tree is dead, and only it (or its upgraded self) used it.
    let pids = procs_in_tree(&path);
    if !pids.is_empty() {
        let shown: Vec<String> = pids.iter().take(10).map(|p| p.to_string()).collect();
        warn!(log, "killing processes left by a master that died without stopping";
            "cgroup" => path.display().to_string(), "processes" => pids.len(), "pids" => shown.join(" "));
    }
    if let Err(e) = kill_tree(&path) {
        warn!(log, "could not kill the previous master's cgroup"; "cgroup" => path.display().to_string(), "error" => format!("write cgroup.kill: {}", describe(e)));
    }
    if !wait_empty(&path, KILL_WAIT) {
        warn!(log, "processes of the previous master's cgroup survived SIGKILL"; "cgroup" => path.display().to_string());
    }
    match remove_tree(&path) {
        Ok(()) => forget(),
        Err(e) => {
            warn!(log, "could not remove the previous master's cgroup"; "cgroup" => path.display().to_string(), "error" => e)
        }
    }
}

/// Whether `path` is absolute and named like a tree of ours, `zdd-<pid>-<hex>`.
fn is_tree_name(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let parts = name.strip_prefix("zdd-").and_then(|r| r.split_once('-'));
    path.is_absolute()
        && parts.is_some_and(|(pid, tag)| {
            pid.parse::<u32>().is_ok() && !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// 64 random bits in hex, to tell apart trees of masters whose pids collide.
fn random_tag() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the buffer it is given.
    let n = unsafe { nix::libc::getrandom(b.as_mut_ptr() as *mut nix::libc::c_void, b.len(), 0) };
    if n != b.len() as isize {
        // No entropy (very early boot): the clock's nanoseconds still tell masters apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = t.to_ne_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn rmdir(path: &Path) -> Result<(), Errno> {
    std::fs::remove_dir(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
}

fn open_fd(path: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
    let fd = open(path, flags, Mode::empty())?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), Errno> {
    let fd = open_fd(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC)?;
    nix::unistd::write(&fd, data).map(|_| ())
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Whether `cgroup.events` says the cgroup (or a descendant) has processes.
fn populated(events: &OwnedFd) -> Option<bool> {
    let mut buf = [0u8; 256];
    let n = nix::sys::uio::pread(events.as_fd(), &mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// Every pid in `dir` and its descendant cgroups.
fn procs_in_tree(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(procs_in_tree(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL to every process in `dir` and below: `cgroup.kill` (Linux 5.14), else each pid.
fn kill_tree(dir: &Path) -> Result<(), Errno> {
    match write_file(&dir.join("cgroup.kill"), b"1") {
        Err(Errno::ENOENT) if dir.is_dir() => {
            for pid in procs_in_tree(dir) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            Ok(())
        }
        Err(Errno::ENOENT) => Ok(()),
        other => other,
    }
}

/// Wait until nothing lives in `dir` any more, at most `timeout`, woken by `cgroup.events`.
/// Kills again on each wake-up, for kernels without `cgroup.kill` where a fork can race.
fn wait_empty(dir: &Path, timeout: Duration) -> bool {
    let Ok(events) = open_fd(&dir.join("cgroup.events"), OFlag::O_RDONLY | OFlag::O_CLOEXEC) else {
        return !dir.exists();
    };
    let end = Instant::now() + timeout;
    loop {
        match populated(&events) {
            Some(false) => return true,
            None => return false,
            Some(true) => {}
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = [nix::libc::pollfd {
            fd: events.as_raw_fd(),
            events: nix::libc::POLLPRI,
            revents: 0,
        }];
        // At most 100 ms, so that the fallback kill is repeated.
        let ms = left.as_millis().clamp(1, 100) as i32;
        // SAFETY: one valid pollfd, exclusively borrowed.
        unsafe { nix::libc::poll(pfd.as_mut_ptr(), 1, ms) };
        let _ = kill_tree(dir);
    }
}

/// rmdir every cgroup below `dir`, deepest first, then `dir`.
fn remove_tree(dir: &Path) -> Result<(), String> {
    for sub in subdirs(dir) {
        remove_tree(&sub)?;
    }
    match rmdir(dir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(format!("rmdir {}: {}", dir.display(), describe(e))),
    }
}

/// `zdd-<pid>-<random>` in the master's own cgroup, or the reason it cannot be created.
fn create_root() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {}", describe_io(&e)))?;
    let (mount, mount_root) = cgroup2_mount(&mountinfo).ok_or("no cgroup2 filesystem is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("read /proc/self/cgroup: {}", describe_io(&e)))?;
    let own = own_cgroup(&own).ok_or("/proc/self/cgroup has no cgroup v2 (\"0::\") line")?;
    let dir = cgroup_dir(&mount, &mount_root, &own).ok_or_else(|| {
        format!(
            "the master's cgroup {own} is not visible under the cgroup2 mount at {}",
            mount.display()
        )
    })?;
    let procs = dir.join("cgroup.procs");
    nix::unistd::access(&procs, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("cannot move processes in {}: {}", dir.display(), describe(e)))?;
    let root = dir.join(format!("zdd-{}-{}", std::process::id(), random_tag()));
    nix::unistd::mkdir(&root, Mode::from_bits_truncate(0o755))
        .map_err(|e| format!("mkdir {}: {}", root.display(), describe(e)))?;
    Ok(root)
}

fn write_record(record: &Path, root: &Path) -> Result<(), String> {
    let fd = nix::fcntl::open(
        record,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| format!("open: {}", describe(e)))?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut text = root.as_os_str().as_encoded_bytes().to_vec();
    text.push(b'\n');
    nix::unistd::write(&fd, &text)
        .map(|_| ())
        .map_err(|e| format!("write: {}", describe(e)))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cgroup2 mount: (mount point, root of the mount within the hierarchy).
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = before.split(' ').collect();
        Some((PathBuf::from(unescape(f.get(4)?)), unescape(f.get(3)?)))
    })
}

/// The cgroup v2 path in a /proc/<pid>/cgroup text.
fn own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_string())
}

/// The directory of cgroup `own` under a mount at `mount` whose root is `mount_root`.
fn cgroup_dir(mount: &Path, mount_root: &str, own: &str) -> Option<PathBuf> {
    if !own.starts_with('/') || own.split('/').any(|c| c == "..") || own.ends_with(" (deleted)") {
        return None;
    }
    let rel = if mount_root == "/" {
        own
    } else {
        let rest = own.strip_prefix(mount_root)?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_string()))
        );
        assert_eq!(cgroup2_mount("32 31 0:29 / /x rw - cgroup cgroup rw,cpu\n"), None);
        assert_eq!(
            cgroup2_mount("1 2 0:3 /a\\040b /mnt/c\\040g rw - cgroup2 cgroup2 rw\n"),
            Some((PathBuf::from("/mnt/c g"), "/a b".to_string()))
        );
    }

    #[test]
    fn reads_the_v2_line_of_proc_cgroup() {
        assert_eq!(
            own_cgroup("9:name=systemd:/\n4:memory:/x\n0::/system.slice/zdd@app.service\n").as_deref(),
            Some("/system.slice/zdd@app.service")
        );
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn maps_a_cgroup_to_its_directory() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(cgroup_dir(m, "/", "/"), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            cgroup_dir(m, "/", "/system.slice/a.service"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/a.service"))
        );
        assert_eq!(cgroup_dir(m, "/lxc", "/lxc/x"), Some(PathBuf::from("/sys/fs/cgroup/x")));
        assert_eq!(cgroup_dir(m, "/lxc", "/lxcother"), None);
        assert_eq!(cgroup_dir(m, "/", "/../.."), None);
        assert_eq!(cgroup_dir(m, "/", "/a (deleted)"), None);
    }

    #[test]
    fn record_sits_beside_the_pid_file() {
        assert_eq!(
            record_path(Path::new("/run/zdd/app.pid")),
            PathBuf::from("/run/zdd/app.pid.cgroup")
        );
        assert!(is_tree_name(Path::new("/sys/fs/cgroup/zdd-42-00ff")));
        assert!(is_tree_name(
            &Path::new("/sys/fs/cgroup").join(format!("zdd-1-{}", random_tag()))
        ));
        assert!(!is_tree_name(Path::new("/sys/fs/cgroup/zdd-42")));
        assert!(!is_tree_name(Path::new("/sys/fs/cgroup/other")));
        assert!(!is_tree_name(Path::new("zdd-42-ab")));
    }
}
