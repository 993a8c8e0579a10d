//! Uniform rendering of OS errors: `permission denied (EACCES)`, the way nginx and tini name
//! them, so that every message names the syscall, the object and the errno.

use nix::errno::Errno;

/// `permission denied (EACCES)`.
pub fn describe(e: Errno) -> String {
    let desc = e.desc();
    let mut chars = desc.chars();
    let lowered = match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect::<String>(),
        None => String::new(),
    };
    if e == Errno::EMFILE {
        // The limit, not the errno, is what an operator needs to act on.
        if let Ok((soft, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            return format!(
                "{lowered} (EMFILE: zdd's open-file limit RLIMIT_NOFILE is {soft}, hard limit {hard}; \
                 raise it with LimitNOFILE= or ulimit -n)"
            );
        }
    }
    format!("{lowered} ({e:?})")
}

/// Raise this process's soft open-file limit to its hard limit, as systemd does for its own
/// services' managers: the master holds two pipes per worker and every listener, and a soft
/// limit of 1024 is reached at a few hundred workers. Returns the limits as they were, which
/// the workers get back (a soft limit above 1024 breaks programs that use `select`).
pub fn raise_nofile() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        // A hard limit of "infinity" cannot be a soft one (nr_open caps it): then stay put.
        let target = if hard == nix::libc::RLIM_INFINITY {
            std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(soft)
        } else {
            hard
        };
        if target > soft {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, target, hard);
        }
    }
    Some((soft, hard))
}

/// The same for a `std::io::Error`, falling back to its own text when it carries no errno.
pub fn describe_io(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => describe(Errno::from_raw(n)),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_errno() {
        assert_eq!(describe(Errno::EACCES), "permission denied (EACCES)");
        assert_eq!(
            describe_io(&std::io::Error::from_raw_os_error(2)),
            "no such file or directory (ENOENT)"
        );
    }
}
