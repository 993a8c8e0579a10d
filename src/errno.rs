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
    format!("{lowered} ({e:?})")
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
