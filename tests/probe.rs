//! `[worker.probe]`: each new worker is probed through its own private listener before the
//! old generation is told to stop; a failed probe fails the reload and the old generation
//! keeps serving, with no request lost. Every test runs the real `zdd` binary (and, for the
//! headline case, gunicorn without `--preload`).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// A daemon-mode config whose worker is the fixture with `args`, probed by `probe` (the body
/// of `[worker.probe]`).
fn config(port: u16, args: &[&str], probe: &str) -> String {
    daemon_config(port, args, &format!("[worker.probe]\n{probe}"))
}

fn start(z: &Zdd) {
    let o = zdd(z, &["start"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stderr(&o), z.log_text());
}

fn stop(z: &Zdd) {
    let o = zdd(z, &["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    wait_for("the master to be gone", DEADLINE, || {
        (!z.path("run/app.pid").exists()).then_some(())
    });
    z.assert_clean();
}

/// The master's JSON log records with this message.
fn records(z: &Zdd, msg: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(z.path("zdd.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["msg"] == msg)
        .collect()
}

fn worker_pids(z: &Zdd) -> Vec<i32> {
    records(z, "worker started")
        .iter()
        .map(|r| r["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// The fd layout a worker gets with a probe: every [[listen]] fd first, then the private
/// listener — a listening TCP socket on 127.0.0.1 — counted and named like the others.
#[test]
fn the_probe_listener_is_the_last_fd_and_named() {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\ncompat = [\"einhorn\", \"server_starter\"]\n\
         [worker.probe]\ntcp = true\nname = \"health\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n[[listen]]\nname = \"admin\"\nunix = \"{{dir}}/admin.sock\"\n"
    ));
    z.wait_ready();
    let pid = z.started_pids()[0];
    let r = z.report(pid);
    let env = &r["env"];
    assert_eq!(env["LISTEN_FDS"], "3");
    assert_eq!(env["LISTEN_FDNAMES"], "http:admin:health");
    assert_eq!(env["LISTEN_PID"], pid.to_string());
    assert_eq!(env["EINHORN_FD_COUNT"], "3");
    assert_eq!(env["EINHORN_FD_2"], "5");
    let fds: BTreeMap<String, String> = serde_json::from_value(r["fds"].clone()).unwrap();
    // 0-2, the two listeners, the probe listener, and the fixture's own listing.
    assert_eq!(fds.len(), 7, "{fds:?}");
    let inode = fds["5"]
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("fd 5 is not a socket: {fds:?}"));
    // /proc/net/tcp: local address 0100007F:PORT, state 0A (LISTEN), the inode in column 10.
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = tcp
        .lines()
        .find(|l| l.split_whitespace().nth(9) == Some(inode))
        .unwrap_or_else(|| panic!("socket {inode} not in /proc/net/tcp"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert!(cols[1].starts_with("0100007F:"), "{line}");
    assert_eq!(cols[3], "0A", "not listening: {line}");
    let probe_port = u16::from_str_radix(&cols[1][9..], 16).unwrap();
    assert_ne!(probe_port, port);
    assert!(
        env["SERVER_STARTER_PORT"]
            .as_str()
            .unwrap()
            .ends_with(&format!(";127.0.0.1:{probe_port}=5")),
        "{env}"
    );
    // The fixture serves every fd it got: the private port answers with this very worker.
    assert_eq!(ask(addr(probe_port)).unwrap(), (pid, 1));
    z.stop();
}

#[test]
fn a_passing_probe_commits_the_reload() {
    let port = free_port();
    let probe = "http = \"/healthz\"\ntimeout = \"5s\"\n";
    let z = Zdd::new(&config(port, &["--ready", "--serve", "--http-status", "200"], probe));
    start(&z);
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("reloaded: generation 2 serving"), "{}", stdout(&o));
    let pids = worker_pids(&z);
    assert_eq!(ask_gen(addr(port), 2), pids[1]);
    // Both workers were probed before they counted as ready.
    let passed: Vec<i64> = records(&z, "probe passed")
        .iter()
        .map(|r| r["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(passed, vec![pids[0] as i64, pids[1] as i64]);
    stop(&z);
}

#[test]
fn a_probe_answered_500_fails_the_reload_and_the_old_generation_serves_on() {
    let port = free_port();
    let probe = "http = \"/healthz\"\nretries = 1\nretry_delay = \"50ms\"\n";
    let z = Zdd::new(&config(port, &["--ready", "--serve", "--http-status", "200"], probe));
    start(&z);
    let old = ask(addr(port)).unwrap();
    assert_eq!(old.1, 1);
    let load = Load::start(addr(port), 4);
    z.write_config(&config(port, &["--ready", "--serve", "--http-status", "500"], probe));
    let o = zdd(&z, &["reload"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let new = *worker_pids(&z).last().unwrap();
    assert!(
        e.contains(&format!(
            "reload failed: probe GET /healthz on worker pid {new}: status 500 (Fixture) \"{new} 2\", expected 200-399 (2 attempts)"
        )),
        "{e}"
    );
    assert!(e.contains("generation 1 keeps serving"), "{e}");
    // No connection failed (`finish` asserts it). The new worker shares the [[listen]]
    // socket, so while it was probed it may have answered a few requests itself.
    let seen = load.finish().seen;
    assert!(
        seen.iter().all(|&(g, p)| (g, p) == (1, old.0) || (g, p) == (2, new)),
        "{seen:?}"
    );
    assert_eq!(ask(addr(port)).unwrap(), old);
    wait_for("the new worker to be gone", DEADLINE, || (!alive(new)).then_some(()));
    assert_eq!(status(&z)["generation"], 1);
    stop(&z);
}

#[test]
fn a_worker_that_never_answers_fails_after_every_attempt() {
    let port = free_port();
    let probe = "http = \"/healthz\"\ntimeout = \"300ms\"\nretries = 2\nretry_delay = \"100ms\"\n";
    let z = Zdd::new(&config(port, &["--ready", "--serve", "--http-status", "200"], probe));
    start(&z);
    // Says READY=1 and never accepts a connection.
    z.write_config(&config(port, &["--ready"], probe));
    let began = Instant::now();
    let o = zdd(&z, &["reload"]);
    let took = began.elapsed();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("reload failed: probe GET /healthz on worker pid")
            && e.contains(": no answer within 300ms (3 attempts)"),
        "{e}"
    );
    assert!(took >= Duration::from_millis(1100), "{took:?}");
    assert_eq!(ask(addr(port)).unwrap().1, 1);
    stop(&z);
}

#[test]
fn a_tcp_probe_passes_once_the_worker_accepts_and_fails_when_it_never_does() {
    let port = free_port();
    let probe = "tcp = true\ntimeout = \"300ms\"\nretries = 1\nretry_delay = \"50ms\"\n";
    let z = Zdd::new(&config(port, &["--ready", "--serve"], probe));
    start(&z);
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(ask_gen(addr(port), 2), worker_pids(&z)[1]);
    z.write_config(&config(port, &["--ready"], probe));
    let o = zdd(&z, &["reload"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("reload failed: probe tcp on worker pid")
            && e.contains(": connection not accepted within 300ms (2 attempts)"),
        "{e}"
    );
    assert_eq!(ask(addr(port)).unwrap().1, 2);
    stop(&z);
}

/// `interval`: a serving worker that stops answering its probe is replaced after `failures`
/// consecutive misses; while it answers, nothing happens.
#[test]
fn a_serving_worker_that_keeps_missing_its_probe_is_replaced() {
    let port = free_port();
    let flag = "{dir}/unhealthy";
    let probe = "http = \"/healthz\"\ntimeout = \"200ms\"\ninterval = \"100ms\"\nfailures = 3\n";
    let z = Zdd::new(&daemon_config(
        port,
        &["--ready", "--serve", "--http-status", "200", "--http-fail-file", flag],
        &format!("env = {{ FIXTURE_EVENTS = \"{{dir}}/events\" }}\n[worker.probe]\n{probe}"),
    ));
    start(&z);
    let first = worker_pids(&z)[0];
    // The cut-over probe and two interval probes pass: no miss is logged.
    wait_for("three probes answered", DEADLINE, || {
        let events = std::fs::read_to_string(z.path("events")).unwrap_or_default();
        (events.lines().filter(|l| l.contains(" http ")).count() >= 3).then_some(())
    });
    assert!(records(&z, "probe missed").is_empty(), "{}", z.log_text());
    std::fs::write(z.path("unhealthy"), "").unwrap();
    wait_for("the unhealthy worker to be replaced", DEADLINE, || {
        (worker_pids(&z).len() >= 2).then_some(())
    });
    let missed = records(&z, "probe missed");
    assert!(missed.len() >= 3, "{missed:?}");
    assert!(
        missed[0]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("probe GET /healthz on worker pid {first}: status 500")),
        "{missed:?}"
    );
    assert!(
        z.log_text().contains("worker failed its health probe; replacing it"),
        "{}",
        z.log_text()
    );
    std::fs::remove_file(z.path("unhealthy")).unwrap();
    wait_for("the old worker to be gone", DEADLINE, || (!alive(first)).then_some(()));
    let second = worker_pids(&z)[1];
    wait_for("the replacement to serve", DEADLINE, || {
        (ask(addr(port)).ok()? == (second, 1)).then_some(())
    });
    stop(&z);
}

/// `zdd upgrade` hands each worker's probe listener over: the serving worker's interval probes
/// go on through it, and the next reload is probed as before.
#[test]
fn probes_go_on_after_an_upgrade() {
    let port = free_port();
    let probe = "http = \"/healthz\"\ntimeout = \"1s\"\ninterval = \"100ms\"\n";
    let z = Zdd::new(&daemon_config(
        port,
        &["--ready", "--serve", "--http-status", "200"],
        &format!("env = {{ FIXTURE_EVENTS = \"{{dir}}/events\" }}\n[worker.probe]\n{probe}"),
    ));
    start(&z);
    let first = worker_pids(&z)[0];
    let answered = || {
        std::fs::read_to_string(z.path("events"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{first} http ")))
            .count()
    };
    wait_for("an interval probe", DEADLINE, || (answered() >= 2).then_some(()));
    let o = zdd(&z, &["upgrade"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let after = answered();
    wait_for("interval probes after the upgrade", DEADLINE, || {
        (answered() >= after + 3).then_some(())
    });
    assert!(records(&z, "probe missed").is_empty(), "{}", z.log_text());
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(ask_gen(addr(port), 2), worker_pids(&z)[1]);
    stop(&z);
}

#[test]
fn bad_probe_tables_are_refused_with_their_position() {
    let cases = [
        (
            "http = \"/h\"\ntcp = true",
            "10:8: worker.probe: give either http = \"/path\" or tcp = true, not both",
        ),
        (
            "timeout = \"1s\"",
            "9:1: worker.probe: needs http = \"/path\" or tcp = true",
        ),
        (
            "http = \"/h\"\nstatus = \"500-200\"",
            "11:10: worker.probe.status: range \"500-200\": 500 is above 200",
        ),
        (
            "http = \"/h\"\nname = \"http\"",
            "11:8: worker.probe.name: \"http\" is also a [[listen]] name",
        ),
        (
            "http = \"/h\"\ntimeout = \"0s\"",
            "11:11: worker.probe.timeout: must be longer than 0s",
        ),
    ];
    for (body, want) in cases {
        let z = Zdd::new(&config(free_port(), &["--ready"], body));
        let o = zdd(&z, &["check"]);
        assert_eq!(o.status.code(), Some(2), "{body}");
        let e = stderr(&o);
        assert!(e.contains(&format!("app.toml:{want}")), "{body}: {e}");
    }
}

// ---- gunicorn without --preload: the headline case -------------------------------------------

fn have_gunicorn() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import gunicorn"])
        .status()
        .is_ok_and(|s| s.success())
}

fn gunicorn_config(port: u16, app: &str) -> String {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    format!(
        "[master]\nlog = \"{{dir}}/zdd.log\"\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\n\n\
         [worker]\ncommand = [\"python3\", \"-m\", \"gunicorn\", \"--workers\", \"2\", \"--chdir\", \"{fixtures}\", \"{app}\"]\n\
         ready = \"notify\"\nstart_timeout = \"60s\"\nstop_timeout = \"20s\"\n\
         [worker.probe]\nhttp = \"/healthz\"\ntimeout = \"5s\"\nretries = 3\nretry_delay = \"200ms\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    )
}

/// One HTTP request; the status and body.
fn http_get(port: u16) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// What one client thread saw: requests made, connection failures, answers (the body of a
/// 200, else `status N`).
type ClientResult = (u64, Vec<String>, Vec<String>);

/// HTTP clients, a new connection per request, until stopped: every failure and the
/// generations that answered.
struct HttpLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<ClientResult>>,
}

impl HttpLoad {
    fn start(port: u16, clients: usize) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let (mut n, mut failures, mut bodies) = (0, Vec::new(), Vec::new());
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        match http_get(port) {
                            Ok((200, body)) => bodies.push(body),
                            Ok((status, _)) => bodies.push(format!("status {status}")),
                            Err(e) => failures.push(e.to_string()),
                        }
                    }
                    (n, failures, bodies)
                })
            })
            .collect();
        HttpLoad { stop, threads }
    }

    /// Requests made, how many were answered with an error status, and the generations that
    /// answered 200; asserts that no connection failed (refused, reset, no answer).
    fn finish(self) -> (u64, u64, std::collections::BTreeSet<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut total, mut errors, mut gens) = (0, 0, std::collections::BTreeSet::new());
        for t in self.threads {
            let (n, failures, bodies) = t.join().unwrap();
            assert!(
                failures.is_empty(),
                "{} of {n} requests failed: {:?}",
                failures.len(),
                &failures[..failures.len().min(5)]
            );
            total += n;
            errors += bodies.iter().filter(|b| b.starts_with("status ")).count() as u64;
            gens.extend(
                bodies
                    .iter()
                    .filter(|b| !b.starts_with("status "))
                    .filter_map(|b| b.split_whitespace().nth(1).map(str::to_string)),
            );
        }
        (total, errors, gens)
    }
}

/// gunicorn without `--preload` says READY=1 before its workers import the app: a release
/// whose app fails would be declared ready, the old generation stopped, the site down. With
/// the probe, the reload fails naming it, the old generation serves on, no request is lost.
#[test]
fn gunicorn_without_preload_whose_new_app_fails_keeps_the_old_generation() {
    if !have_gunicorn() {
        missing(
            "gunicorn_without_preload_whose_new_app_fails_keeps_the_old_generation",
            "python3 -m gunicorn not importable",
        );
        return;
    }
    let port = free_port();
    let z = Zdd::new(&gunicorn_config(port, "wsgi_app:app"));
    start(&z);
    assert_eq!(http_get(port).unwrap().0, 200);
    let load = HttpLoad::start(port, 4);

    // Release 2: the app imports, but every request fails (500).
    z.write_config(&gunicorn_config(port, "wsgi_failing:app"));
    let o = zdd(&z, &["reload"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}\n{}", z.log_text());
    assert!(
        e.contains("reload failed: probe GET /healthz on worker pid")
            && e.contains(": status 500 (Internal Server Error)")
            && e.contains("(4 attempts)"),
        "{e}"
    );
    assert!(e.contains("generation 1 keeps serving"), "{e}");

    // Release 3: the app does not even import (its workers fail to boot, gunicorn exits).
    z.write_config(&gunicorn_config(port, "wsgi_broken_import:app"));
    let o = zdd(&z, &["reload"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}\n{}", z.log_text());
    assert!(
        e.contains("reload failed: worker pid") && e.contains("during start-up") && e.contains("Worker failed to boot"),
        "{e}"
    );
    assert!(e.contains("generation 1 keeps serving"), "{e}");

    // No connection was lost. Release 2's workers share the [[listen]] socket: while they
    // were probed they answered some requests themselves (500): counted, not hidden.
    let (requests, errors, gens) = load.finish();
    eprintln!(
        "gunicorn under load: {requests} requests, 0 lost, {errors} answered 500 by release 2 while it was probed"
    );
    assert!(requests > 0);
    assert_eq!(gens.into_iter().collect::<Vec<_>>(), vec!["1".to_string()]);
    assert_eq!(http_get(port).unwrap().0, 200);
    assert_eq!(status(&z)["generation"], 1);
    stop(&z);
}
