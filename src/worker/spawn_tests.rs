//! Unit tests of spawn.rs (the environment and program look-up a worker gets).

use super::*;

#[test]
fn removes_inherited_systemd_variables() {
    for k in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        assert!(inherited_is_removed(OsStr::new(k)), "{k}");
    }
    for k in ["PATH", "HOME", "LISTENER", "NOTIFY"] {
        assert!(!inherited_is_removed(OsStr::new(k)), "{k}");
    }
}

#[test]
fn resolves_program_in_path() {
    assert_eq!(
        resolve_program("sh", Some(OsStr::new("/nonexistent:/bin"))).unwrap(),
        PathBuf::from("/bin/sh")
    );
    assert!(matches!(
        resolve_program("no-such-program-zdd", Some(OsStr::new("/bin"))),
        Err(SpawnError::NotFound(_))
    ));
    assert_eq!(resolve_program("./x", None).unwrap(), PathBuf::from("./x"));
}
