//! Unit tests of the config loader: parsing, validation, error placement, host checks.

use std::os::unix::fs::PermissionsExt;

use super::validate::{parse_signal, tcp_overlap};
use super::*;

fn p(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("/etc/zdd/app.toml"), text)
}

fn err(text: &str) -> String {
    p(text).unwrap_err().to_string()
}

const MIN: &str = "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:8080\"\n";

#[test]
fn smallest_file_gets_defaults() {
    let c = p(MIN).unwrap();
    assert_eq!(c.worker.count, 1);
    assert_eq!(c.worker.ready, Ready::Auto);
    assert_eq!(c.worker.start_timeout, Duration::from_secs(60));
    assert_eq!(c.worker.stop_timeout, Duration::from_secs(30));
    assert_eq!(c.worker.stop_signal, Signal::SIGTERM);
    assert_eq!(c.worker.restart, Restart::Always);
    assert_eq!(c.worker.reload, ReloadMode::AllAtOnce);
    assert_eq!(c.worker.stable_after, Duration::from_secs(5));
    assert_eq!(c.master.log, LogTarget::Stderr);
    assert_eq!(c.master.max_draining, 2);
    assert_eq!(c.listen[0].backlog, nix::libc::SOMAXCONN);
    assert_eq!(c.master.pid_file.file_name().unwrap(), "app.pid");
    assert_eq!(c.master.control_socket.file_name().unwrap(), "app.sock");
}

/// Every key of the file (config/state.rs's round trip reads it too).
pub(super) const EVERY_KEY: &str = r#"
[master]
pid_file = "run/app.pid"
control_socket = "/tmp/x/app.sock"
log = "/var/log/zdd.log"
log_format = "json"
max_draining = 3
metrics = "127.0.0.1:9101"
[worker]
command = ["/bin/sh", "-c", "exit 0"]
cwd = "/srv"
env = { A = "1", B = "two" }
user = "0"
group = "0"
count = 4
ready = "delay"
ready_delay = "250ms"
start_timeout = "1m30s"
stop_signal = "QUIT"
stop_timeout = "5s"
restart = "on-failure"
reload = "rolling"
max_surge = 2
stable_after = "10s"
umask = "0027"
compat = ["einhorn", "server_starter"]
[worker.probe]
http = "/healthz?full=1"
status = "200-299"
host = "app.internal"
timeout = "2s"
retries = 5
retry_delay = "100ms"
name = "health"
interval = "10s"
failures = 2
[rlimits]
nofile = 4096
core = { soft = 0, hard = "infinity" }
[[listen]]
name = "http"
tcp = "[::1]:8080"
backlog = 511
[[listen]]
name = "admin"
unix = "admin.sock"
mode = "0660"
owner = "0"
group = "0"
[[listen]]
name = "abs"
unix = "@zdd-test"
[hooks]
before_reload = ["bin/check-app", "--strict"]
after_reload = ["/bin/true"]
timeout = "5s"
"#;

#[test]
fn every_key_is_read() {
    let c = p(EVERY_KEY).unwrap();
    assert_eq!(c.master.pid_file, PathBuf::from("/etc/zdd/run/app.pid"));
    assert_eq!(c.master.notify_socket, PathBuf::from("/tmp/x/app.notify"));
    assert_eq!(c.master.log_format, LogFormat::Json);
    assert_eq!(c.master.max_draining, 3);
    assert_eq!(
        c.master.metrics,
        Some(ListenAddr::Tcp("127.0.0.1:9101".parse().unwrap()))
    );
    assert_eq!(c.worker.env, vec![("A".into(), "1".into()), ("B".into(), "two".into())]);
    assert_eq!(c.worker.count, 4);
    assert_eq!(c.worker.ready, Ready::Delay(Duration::from_millis(250)));
    assert_eq!(c.worker.start_timeout, Duration::from_secs(90));
    assert_eq!(c.worker.stop_signal, Signal::SIGQUIT);
    assert_eq!(c.worker.restart, Restart::OnFailure);
    assert_eq!(c.worker.reload, ReloadMode::Rolling { max_surge: 2 });
    assert_eq!(c.worker.stable_after, Duration::from_secs(10));
    assert_eq!(c.worker.umask, Some(0o027));
    assert_eq!(c.worker.compat, vec![Compat::Einhorn, Compat::ServerStarter]);
    assert_eq!(c.worker.credentials.as_ref().unwrap().uid, Uid::from_raw(0));
    assert_eq!(c.rlimits.len(), 2);
    let core = c.rlimits.iter().find(|r| r.name == "core").unwrap();
    assert_eq!((core.soft, core.hard), (0, nix::libc::RLIM_INFINITY));
    assert_eq!(c.listen[0].addr, ListenAddr::Tcp("[::1]:8080".parse().unwrap()));
    assert_eq!(c.listen[0].backlog, 511);
    assert_eq!(c.listen[1].addr, ListenAddr::Unix("/etc/zdd/admin.sock".into()));
    assert_eq!(c.listen[1].mode, Some(0o660));
    assert_eq!(c.listen[2].addr, ListenAddr::Abstract("zdd-test".into()));
    assert_eq!(
        c.hooks.before_reload,
        Some(vec!["bin/check-app".to_string(), "--strict".to_string()])
    );
    assert_eq!(c.hooks.after_reload, Some(vec!["/bin/true".to_string()]));
    assert_eq!(c.hooks.timeout, Duration::from_secs(5));
    let probe = c.worker.probe.as_ref().unwrap();
    assert_eq!(
        probe.check,
        ProbeCheck::Http {
            path: "/healthz?full=1".into(),
            host: "app.internal".into(),
            status: (200, 299)
        }
    );
    assert_eq!(probe.timeout, Duration::from_secs(2));
    assert_eq!((probe.retries, probe.failures), (5, 2));
    assert_eq!(probe.retry_delay, Duration::from_millis(100));
    assert_eq!(probe.name, "health");
    assert_eq!(probe.interval, Some(Duration::from_secs(10)));
}

const PROBE_HEAD: &str =
    "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:8080\"\n[worker.probe]\n";

#[test]
fn probe_defaults() {
    let c = p(&format!("{PROBE_HEAD}http = \"/healthz\"\n")).unwrap();
    let probe = c.worker.probe.unwrap();
    assert_eq!(
        probe.check,
        ProbeCheck::Http {
            path: "/healthz".into(),
            host: "localhost".into(),
            status: (200, 399)
        }
    );
    assert_eq!(probe.timeout, Duration::from_secs(5));
    assert_eq!(probe.retries, 3);
    assert_eq!(probe.retry_delay, Duration::from_millis(500));
    assert_eq!(probe.name, PROBE_NAME);
    assert_eq!(probe.interval, None);
    assert_eq!(probe.failures, 3);
    assert_eq!(p(MIN).unwrap().worker.probe, None);
    let tcp = p(&format!("{PROBE_HEAD}tcp = true\nretries = 0\n"))
        .unwrap()
        .worker
        .probe
        .unwrap();
    assert_eq!((tcp.check, tcp.retries), (ProbeCheck::Tcp, 0));
}

#[test]
fn probe_status_forms() {
    for (v, want) in [
        ("\"200\"", (200, 200)),
        ("\"200-299\"", (200, 299)),
        ("204", (204, 204)),
        ("\"100-599\"", (100, 599)),
    ] {
        let c = p(&format!("{PROBE_HEAD}http = \"/\"\nstatus = {v}\n")).unwrap();
        match c.worker.probe.unwrap().check {
            ProbeCheck::Http { status, .. } => assert_eq!(status, want, "{v}"),
            ProbeCheck::Tcp => panic!("tcp"),
        }
    }
}

/// Line 7 is the first line inside `[worker.probe]` of [`PROBE_HEAD`].
#[test]
fn bad_probes_are_rejected_with_key_and_position() {
    let cases = [
        ("http = \"/h\"\ntcp = true", "worker.probe", "7:8", "not both"),
        (
            "timeout = \"1s\"",
            "worker.probe",
            "6:1",
            "needs http = \"/path\" or tcp = true",
        ),
        ("tcp = false", "worker.probe", "6:1", "needs http"),
        ("http = \"healthz\"", "worker.probe.http", "7:8", "not a request path"),
        ("http = \"/a b\"", "worker.probe.http", "7:8", "not a request path"),
        (
            "http = \"/\"\nstatus = \"299-200\"",
            "worker.probe.status",
            "8:10",
            "299 is above 200",
        ),
        (
            "http = \"/\"\nstatus = \"2xx\"",
            "worker.probe.status",
            "8:10",
            "expected a status",
        ),
        (
            "http = \"/\"\nstatus = 700",
            "worker.probe.status",
            "8:10",
            "expected a status",
        ),
        (
            "http = \"/\"\nstatus = \"200-\"",
            "worker.probe.status",
            "8:10",
            "expected a status",
        ),
        (
            "tcp = true\nstatus = 200",
            "worker.probe.status",
            "8:10",
            "only applies to http probes",
        ),
        (
            "tcp = true\nhost = \"x\"",
            "worker.probe.host",
            "8:8",
            "only applies to http probes",
        ),
        ("http = \"/\"\nhost = \"a b\"", "worker.probe.host", "8:8", "printable"),
        (
            "http = \"/\"\ntimeout = \"0s\"",
            "worker.probe.timeout",
            "8:11",
            "longer than 0s",
        ),
        (
            "http = \"/\"\ntimeout = \"25h\"",
            "worker.probe.timeout",
            "8:11",
            "maximum of 24h",
        ),
        (
            "http = \"/\"\ninterval = \"0s\"",
            "worker.probe.interval",
            "8:12",
            "longer than 0s",
        ),
        (
            "http = \"/\"\nretries = -1",
            "worker.probe.retries",
            "8:11",
            "between 0 and 100",
        ),
        (
            "http = \"/\"\nfailures = 2",
            "worker.probe.failures",
            "8:12",
            "only used with interval",
        ),
        (
            "http = \"/\"\ninterval = \"1s\"\nfailures = 0",
            "worker.probe.failures",
            "9:12",
            "between 1 and 100",
        ),
        (
            "http = \"/\"\nname = \"a:b\"",
            "worker.probe.name",
            "8:8",
            "without ':'",
        ),
        (
            "http = \"/\"\nname = \"http\"",
            "worker.probe.name",
            "8:8",
            "\"http\" is also a [[listen]] name",
        ),
        ("http = \"/\"\nname = \"\"", "worker.probe.name", "8:8", "printable"),
        ("http = \"/\"\npath = \"/x\"", "", "8:1", "unknown field `path`"),
    ];
    for (body, key, pos, msg) in cases {
        let e = err(&format!("{PROBE_HEAD}{body}\n"));
        let head = if key.is_empty() {
            format!("/etc/zdd/app.toml:{pos}: ")
        } else {
            format!("/etc/zdd/app.toml:{pos}: {key}: ")
        };
        assert!(e.starts_with(&head) && e.contains(msg), "{body}: {e}");
    }
}

#[test]
fn a_rolling_reload_replaces_one_slot_at_a_time_by_default() {
    let c = p(&MIN.replace("[[listen]]", "reload = \"rolling\"\n[[listen]]")).unwrap();
    assert_eq!(c.worker.reload, ReloadMode::Rolling { max_surge: 1 });
    let c = p(&MIN.replace("[[listen]]", "stable_after = \"0s\"\n[[listen]]")).unwrap();
    assert_eq!(c.worker.stable_after, Duration::ZERO);
    let e = err(&MIN.replace("[[listen]]", "max_surge = 1\n[[listen]]"));
    assert!(
        e.contains("worker.max_surge: only used with reload = \"rolling\""),
        "{e}"
    );
}

#[test]
fn ready_modes_are_read() {
    for (mode, ready) in [
        ("notify", Ready::Notify),
        ("listening", Ready::Listening),
        ("auto", Ready::Auto),
    ] {
        let text = format!("[worker]\ncommand = [\"/bin/true\"]\nready = \"{mode}\"\n[[listen]]\nname = \"a\"\ntcp = \"127.0.0.1:1\"\n");
        let c = p(&text).unwrap();
        assert_eq!(c.worker.ready, ready);
    }
    let e = err("[worker]\ncommand = [\"/bin/true\"]\nready = \"listening\"\nready_delay = \"1s\"\n");
    assert!(
        e.contains("worker.ready_delay: only used with ready = \"delay\""),
        "{e}"
    );
    let e = err("[worker]\ncommand = [\"/bin/true\"]\nready = \"listening\"\n");
    assert!(
        e.contains("worker.ready: ready = \"listening\" needs at least one [[listen]]"),
        "{e}"
    );
    let e = err("[worker]\ncommand = [\"/bin/true\"]\nready = \"soon\"\n");
    assert!(e.contains("\"listening\" or \"auto\""), "{e}");
}

#[test]
fn unknown_key_names_key_and_position() {
    let e = err("[worker]\ncommand = [\"/bin/true\"]\ncuont = 2\n");
    assert!(e.starts_with("/etc/zdd/app.toml:3:1: "), "{e}");
    assert!(e.contains("unknown field `cuont`"), "{e}");
}

#[test]
fn unknown_table_is_rejected() {
    let e = err("[worker]\ncommand = [\"/bin/true\"]\n[mastr]\nlog = \"stderr\"\n");
    assert!(e.contains("unknown field `mastr`"), "{e}");
}

#[test]
fn type_error_names_key() {
    let e = err("[worker]\ncommand = [\"/bin/true\"]\ncount = \"two\"\n");
    assert!(e.starts_with("/etc/zdd/app.toml:3:9: worker.count: "), "{e}");
}

#[test]
fn bad_values_are_rejected_with_key() {
    let cases = [
        ("count = 0", "worker.count", "3:9"),
        ("ready = \"soon\"", "worker.ready", "3:9"),
        ("stop_timeout = \"5 parsecs\"", "worker.stop_timeout", "3:16"),
        ("stop_signal = \"NOPE\"", "worker.stop_signal", "3:15"),
        ("restart = \"sometimes\"", "worker.restart", "3:11"),
        ("umask = \"999\"", "worker.umask", "3:9"),
        ("user = \"no-such-user-zdd\"", "worker.user", "3:8"),
        ("compat = [\"inetd\"]", "worker.compat", "3:11"),
        ("ready_delay = \"1s\"", "worker.ready_delay", "3:15"),
        ("reload = \"blue-green\"", "worker.reload", "3:10"),
        ("max_surge = 2", "worker.max_surge", "3:13"),
        ("reload = \"rolling\"\nmax_surge = 0", "worker.max_surge", "4:13"),
        ("stable_after = \"2d\"", "worker.stable_after", "3:16"),
    ];
    for (line, key, pos) in cases {
        let e = err(&format!("[worker]\ncommand = [\"/bin/true\"]\n{line}\n"));
        assert!(
            e.starts_with(&format!("/etc/zdd/app.toml:{pos}: {key}: ")),
            "{line}: {e}"
        );
    }
}

#[test]
fn bad_listeners_are_rejected() {
    let cases = [
        ("name = \"a:b\"\ntcp = \"127.0.0.1:1\"", "listen.name"),
        ("name = \"a\"\ntcp = \"localhost\"", "listen.tcp"),
        ("name = \"a\"", "listen"),
        ("name = \"a\"\ntcp = \"127.0.0.1:1\"\nunix = \"/x\"", "listen"),
        ("name = \"a\"\ntcp = \"127.0.0.1:1\"\nmode = \"0600\"", "listen.mode"),
        ("name = \"a\"\nunix = \"/x\"\nmode = \"9\"", "listen.mode"),
        ("name = \"a\"\ntcp = \"127.0.0.1:1\"\nbacklog = 0", "listen.backlog"),
    ];
    for (body, key) in cases {
        let e = err(&format!("[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\n{body}\n"));
        assert!(e.contains(&format!(": {key}: ")), "{body}: {e}");
    }
}

#[test]
fn duplicate_names_and_addresses_are_rejected() {
    let e = err(&format!("{MIN}[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:8081\"\n"));
    assert!(e.contains("duplicate listener name \"http\""), "{e}");
    let e = err(&format!(
        "{MIN}[[listen]]\nname = \"other\"\ntcp = \"127.0.0.1:8080\"\n"
    ));
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn missing_worker_or_command() {
    assert!(err("[[listen]]\nname = \"a\"\ntcp = \"127.0.0.1:1\"\n").contains("missing table [worker]"));
    assert!(err("[worker]\ncwd = \"/\"\n").contains("missing field `command`"));
    assert!(err("[worker]\ncommand = []\n").contains("worker.command"));
}

#[test]
fn rlimit_errors() {
    let e = err("[worker]\ncommand = [\"/bin/true\"]\n[rlimits]\nfiles = 5\n");
    assert!(e.contains("rlimits.files: unknown resource"), "{e}");
    let e = err("[worker]\ncommand = [\"/bin/true\"]\n[rlimits]\nnofile = { soft = 10, hard = 5 }\n");
    assert!(e.contains("above hard limit"), "{e}");
}

#[test]
fn master_alone_is_read_from_an_otherwise_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.toml");
    std::fs::write(&path, "[master]\ncontrol_socket = \"c.sock\"\n[worker]\ncount = 0\n").unwrap();
    assert!(load(&path).is_err());
    let m = load_master(&path).unwrap();
    assert_eq!(m.control_socket, dir.path().canonicalize().unwrap().join("c.sock"));
    std::fs::write(&path, "[master]\ncontrol_sock = \"c.sock\"\n").unwrap();
    assert!(load_master(&path)
        .unwrap_err()
        .to_string()
        .contains("unknown field `control_sock`"));
}

#[test]
fn syntax_error_has_position() {
    let e = err("[worker\ncommand = 1\n");
    assert!(e.starts_with("/etc/zdd/app.toml:1:"), "{e}");
}

#[test]
fn durations_are_bounded() {
    let e = err("[worker]\ncommand = [\"/bin/true\"]\nstart_timeout = \"500000000000y\"\n");
    assert!(
        e.starts_with(
            "/etc/zdd/app.toml:3:17: worker.start_timeout: \"500000000000y\" is longer than the maximum of 24h"
        ),
        "{e}"
    );
    let e = err("[worker]\ncommand = [\"/bin/true\"]\nstart_timeout = \"0s\"\n");
    assert!(e.contains("worker.start_timeout: must be longer than 0s"), "{e}");
    let c = p("[worker]\ncommand = [\"/bin/true\"]\nstart_timeout = \"24h\"\nstop_timeout = \"0s\"\n").unwrap();
    assert_eq!(c.worker.start_timeout, MAX_DURATION);
    assert_eq!(c.worker.stop_timeout, Duration::ZERO);
}

#[test]
fn argv_is_bounded_and_never_echoed() {
    let big = "x".repeat(MAX_ARG_LEN + 1);
    let e = err(&format!("[worker]\ncommand = [\"/bin/true\", \"{big}\"]\n"));
    assert!(e.contains("argument 1 is 131072 bytes long"), "{e}");
    assert!(e.len() < 300, "{e}");
    let e = err(&format!(
        "[worker]\ncommand = [\"/bin/true\"]\nenv = {{ A = \"{big}\" }}\n"
    ));
    assert!(e.contains("worker.env: \"A\" is 131074 bytes long"), "{e}");
    let e = err(&format!("[worker]\ncommand = [\"/bin/true\"]\nready = \"{big}\"\n"));
    assert!(
        e.contains("got \"xxxxx") && e.contains("… (131072 bytes)") && e.len() < 300,
        "{e}"
    );
}

#[test]
fn error_messages_are_cut() {
    assert_eq!(shown("abc"), "\"abc\"");
    let long = "é".repeat(100);
    let s = shown(&long);
    assert!(s.ends_with("… (200 bytes)") && s.len() < 100, "{s}");
    assert_eq!(cut("short", 10), "short");
    assert!(cut(&long, 5).starts_with("éé…"));
}

#[test]
fn wildcards_overlap_the_addresses_they_cover() {
    let a = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert!(tcp_overlap(&a("0.0.0.0:80"), false, &a("127.0.0.1:80"), false));
    assert!(tcp_overlap(&a("127.0.0.1:80"), false, &a("0.0.0.0:80"), false));
    assert!(tcp_overlap(&a("[::]:80"), false, &a("0.0.0.0:80"), false));
    assert!(tcp_overlap(&a("[::1]:80"), false, &a("[::]:80"), false));
    assert!(tcp_overlap(&a("[::]:80"), false, &a("10.0.0.1:80"), false));
    assert!(!tcp_overlap(&a("0.0.0.0:80"), false, &a("[::1]:80"), false));
    assert!(!tcp_overlap(&a("0.0.0.0:80"), false, &a("127.0.0.1:81"), false));
    assert!(!tcp_overlap(&a("127.0.0.1:80"), false, &a("127.0.0.2:80"), false));
    assert!(!tcp_overlap(&a("0.0.0.0:0"), false, &a("127.0.0.1:0"), false));
    let e = err(&format!("{MIN}[[listen]]\nname = \"all\"\ntcp = \"0.0.0.0:8080\"\n"));
    assert!(
        e.contains("6:1: listen: address 0.0.0.0:8080 overlaps 127.0.0.1:8080 of listener \"http\""),
        "{e}"
    );
}

#[test]
fn text_checks_leave_the_host_alone_and_host_checks_do_not() {
    let text = "[worker]\ncommand = [\"/nonexistent/zdd-server\"]\ncwd = \"/nonexistent\"\n";
    assert!(p(text).is_ok());
    let e = parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Reload)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("worker.cwd: /nonexistent: no such file or directory (ENOENT)"),
        "{e}"
    );
    let text = "[worker]\ncommand = [\"/nonexistent/zdd-server\"]\n";
    let e = parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Reload)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2:11: worker.command: /nonexistent/zdd-server: no such file or directory (ENOENT)"),
        "{e}"
    );
    // A reload does not judge the [master] settings it does not apply.
    let text = "[master]\nlog = \"/nonexistent/dir/zdd.log\"\n[worker]\ncommand = [\"/bin/true\"]\n";
    assert!(parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Reload).is_ok());
    let e = parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Start)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("master.log: directory /nonexistent/dir: no such file"),
        "{e}"
    );
}

#[test]
fn runtime_dir_must_be_ours_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    assert!(check_runtime_dir(dir.path()).is_ok());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = check_runtime_dir(dir.path()).unwrap_err();
    assert!(e.contains("is writable by others") && e.contains("mode 0777"), "{e}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(check_runtime_dir(dir.path()).is_ok());
    let file = dir.path().join("f");
    std::fs::write(&file, "").unwrap();
    assert!(check_runtime_dir(&file).unwrap_err().contains("is not a directory"));
}

#[test]
fn signals_parse_in_every_spelling() {
    assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
    assert_eq!(parse_signal("SIGINT").unwrap(), Signal::SIGINT);
    assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
    assert!(parse_signal("FOO").is_err());
}

#[test]
fn no_hooks_by_default_and_a_30s_timeout() {
    let c = p(MIN).unwrap();
    assert_eq!(c.hooks, HooksConfig::default());
    assert_eq!(c.hooks.timeout, Duration::from_secs(30));
    let c = p(&format!("{MIN}[hooks]\nafter_reload = [\"/bin/true\"]\n")).unwrap();
    assert_eq!(c.hooks.before_reload, None);
    assert_eq!(c.hooks.timeout, HOOK_TIMEOUT);
}

#[test]
fn bad_hooks_are_placed_and_named() {
    // MIN has 5 lines; [hooks] is line 6.
    for (body, at, what) in [
        ("befor_reload = [\"/bin/true\"]", "7:1", "unknown field `befor_reload`"),
        ("before_reload = []", "7:17", "hooks.before_reload: must name a program"),
        (
            "after_reload = [\"\"]",
            "7:16",
            "hooks.after_reload: must name a program",
        ),
        ("before_reload = \"/bin/true\"", "7:17", "hooks.before_reload"),
        ("timeout = \"0s\"", "7:11", "hooks.timeout: must be longer than 0s"),
        ("timeout = \"soon\"", "7:11", "hooks.timeout: invalid duration"),
        ("timeout = \"25h\"", "7:11", "hooks.timeout"),
    ] {
        let e = err(&format!("{MIN}[hooks]\n{body}\n"));
        assert!(e.starts_with(&format!("/etc/zdd/app.toml:{at}: ")), "{body}: {e}");
        assert!(e.contains(what), "{body}: {e}");
    }
}

#[test]
fn a_hook_program_is_resolved_like_the_workers_at_reload() {
    let text = format!("{MIN}[hooks]\nbefore_reload = [\"no-such-hook-zdd\"]\n");
    // The text alone (an upgraded master's re-read) does not look at the host.
    assert!(p(&text).is_ok());
    let e = parse_with(Path::new("/etc/zdd/app.toml"), &text, Checks::Reload)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/etc/zdd/app.toml:7:17: hooks.before_reload: "), "{e}");
    assert!(e.contains("\"no-such-hook-zdd\" not found in PATH"), "{e}");
    let text = format!("{MIN}[hooks]\nafter_reload = [\"sh\", \"-c\", \"true\"]\n");
    assert!(parse_with(Path::new("/etc/zdd/app.toml"), &text, Checks::Reload).is_ok());
}

#[test]
fn master_metrics_addresses_and_errors() {
    let with = |v: &str| format!("[master]\nmetrics = {v:?}\n{MIN}");
    assert_eq!(p(MIN).unwrap().master.metrics, None);
    assert_eq!(
        p(&with("[::1]:9101")).unwrap().master.metrics,
        Some(ListenAddr::Tcp("[::1]:9101".parse().unwrap()))
    );
    assert_eq!(
        p(&with("run/metrics.sock")).unwrap().master.metrics,
        Some(ListenAddr::Unix("/etc/zdd/run/metrics.sock".into()))
    );
    assert_eq!(
        p(&with("@zdd-metrics")).unwrap().master.metrics,
        Some(ListenAddr::Abstract("zdd-metrics".into()))
    );
    let e = err(&with("localhost:9101"));
    assert!(
        e.starts_with("/etc/zdd/app.toml:2:11: master.metrics: \"localhost:9101\" is neither an address"),
        "{e}"
    );
    let e = err(&with("127.0.0.1:0"));
    assert!(e.contains("master.metrics: port 0"), "{e}");
    // Where a [[listen]] listens, or overlapping it.
    let e = err(&with("127.0.0.1:8080"));
    assert!(
        e.contains("master.metrics: 127.0.0.1:8080 is also where listener \"http\" listens"),
        "{e}"
    );
    let e = err(&with("0.0.0.0:8080"));
    assert!(e.contains("is also where listener \"http\""), "{e}");
    let e = err(&format!(
        "[master]\ncontrol_socket = \"/run/a.sock\"\nmetrics = \"/run/a.sock\"\n{MIN}"
    ));
    assert!(
        e.contains("master.metrics: is the same path as master.control_socket"),
        "{e}"
    );
}

#[test]
fn socket_options_are_read_and_checked_with_their_key() {
    let c = p(
        "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"a\"\ntcp = \"*:8080\"\nreuse_port = true\n\
               free_bind = true\nipv6_only = false\ndefer_accept = \"1500ms\"\nkeepalive = true\nnodelay = true\n\
               receive_buffer = \"256KiB\"\nsend_buffer = \"4096\"\n\
               [[listen]]\nname = \"q\"\nudp = \"0.0.0.0:8080\"\n",
    )
    .unwrap();
    let l = &c.listen[0];
    assert_eq!(l.addr, ListenAddr::Tcp("[::]:8080".parse().unwrap()));
    let want = SockOpts {
        any_host: true,
        reuse_port: true,
        free_bind: true,
        ipv6_only: false,
        defer_accept: 2,
        keepalive: true,
        nodelay: true,
        receive_buffer: Some(256 << 10),
        send_buffer: Some(4096),
    };
    assert_eq!(l.opts, want);
    // tcp and udp on one port are two listeners.
    assert_eq!(c.listen[1].addr, ListenAddr::Udp("0.0.0.0:8080".parse().unwrap()));
    assert_eq!(c.listen[1].opts, SockOpts::default());

    let cases = [
        (
            "udp = \"0.0.0.0:443\"\nbacklog = 10",
            "6|listen.backlog: does not apply to udp",
        ),
        (
            "udp = \"0.0.0.0:443\"\ndefer_accept = \"5s\"",
            "6|listen.defer_accept: does not apply to udp",
        ),
        (
            "udp = \"0.0.0.0:443\"\nnodelay = true",
            "6|listen.nodelay: does not apply to udp",
        ),
        (
            "udp = \"0.0.0.0:443\"\nkeepalive = true",
            "6|listen.keepalive: does not apply to udp",
        ),
        (
            "tcp = \"0.0.0.0:443\"\nipv6_only = true",
            "6|listen.ipv6_only: only applies to IPv6",
        ),
        (
            "unix = \"/x.sock\"\nreuse_port = true",
            "6|listen.reuse_port: only applies to tcp and udp",
        ),
        (
            "unix = \"/x.sock\"\nfree_bind = true",
            "6|listen.free_bind: only applies to tcp and udp",
        ),
        (
            "unix = \"/x.sock\"\nnodelay = true",
            "6|listen.nodelay: only applies to tcp",
        ),
        (
            "tcp = \"8080\"\ndefer_accept = \"soon\"",
            "6|listen.defer_accept: invalid duration",
        ),
        (
            "tcp = \"8080\"\nreceive_buffer = \"12\"",
            "6|listen.receive_buffer: \"12\" must be between 1KiB and 1GiB",
        ),
        ("tcp = \"8080\"\nsend_buffer = \"2GiB\"", "6|listen.send_buffer: "),
        (
            "tcp = \"8080\"\nudp = \"8080\"",
            "6|listen: give exactly one of tcp, udp and unix",
        ),
        ("udp = \"*:99999\"", "5|listen.udp: "),
        ("tcp = \"*:\"", "5|listen.tcp: "),
    ];
    for (body, want) in cases {
        let e = err(&format!(
            "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"a\"\n{body}\n"
        ));
        let (line, want) = want.split_once('|').unwrap();
        assert!(e.contains(&format!("app.toml:{line}:")), "{body}: {e}");
        assert!(e.contains(want), "{body}: {e}");
    }
}

#[test]
fn overlap_checks_know_ports_alone_ipv6_only_and_udp() {
    let two = |a: &str, b: &str| {
        p(&format!(
            "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"a\"\n{a}\n[[listen]]\nname = \"b\"\n{b}\n"
        ))
    };
    // A port alone is [::]:P, dual-stack: it covers 127.0.0.1:P, and is [::]:P itself.
    let e = two("tcp = \"8080\"", "tcp = \"127.0.0.1:8080\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlaps [::]:8080"), "{e}");
    let e = two("tcp = \"8080\"", "tcp = \"[::]:8080\"").unwrap_err().to_string();
    assert!(e.contains("listed twice"), "{e}");
    // ipv6_only leaves the IPv4 addresses free.
    assert!(two("tcp = \"[::]:8080\"\nipv6_only = true", "tcp = \"0.0.0.0:8080\"").is_ok());
    assert!(two("tcp = \"0.0.0.0:8080\"", "tcp = \"8080\"\nipv6_only = true").is_ok());
    // Udp overlaps udp, never tcp.
    let e = two("udp = \"0.0.0.0:53\"", "udp = \"127.0.0.1:53\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlaps 0.0.0.0:53"), "{e}");
    assert!(two("udp = \"53\"", "tcp = \"53\"").is_ok());
    assert!(two("udp = \"127.0.0.1:53\"", "tcp = \"127.0.0.1:53\"").is_ok());
    let e = two("udp = \"127.0.0.1:53\"", "udp = \"127.0.0.1:53\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listed twice"), "{e}");
}
