//! `[worker.probe]` with real servers, through the real `zdd` binary, with the default
//! `ready = "auto"`: each server must serve the private probe listener (the last fd) as well
//! as its `[[listen]]` socket. Under an HTTP load (a new connection per request):
//! (a) `zdd start` and `zdd reload` pass the probe and commit with no failed request;
//! (b) a release whose `/healthz` answers 500 (it still serves `/`) fails its reload with
//! `reload failed: probe … status 500`, the old generation keeps serving, no request is lost.
//! The bad release shares the `[[listen]]` socket while it is probed: how many requests it
//! answered meanwhile is printed (`MEASURE`, `cargo test --test servers_probe -- --nocapture`).
//!
//! Also twisted and systemd-socket-proxyd, which docs/servers.md did not run before: a start
//! and a reload under load with the default `ready` (and a probe, where the server can answer
//! it). A missing server skips loudly, and fails when `CI` is set.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// One `GET path HTTP/1.0` on a new connection: the status and the body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {out:?}")))?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// The generation that answered `/`: every app here answers "<pid> <generation>".
fn generation(body: &str) -> Option<u64> {
    body.split_whitespace().nth(1)?.parse().ok()
}

/// What the clients saw: requests, failed requests (unix time in ns, error: no connection, no
/// answer, or an answer cut before its body), and the answers counted by (generation, status).
#[derive(Default, Debug)]
struct Tally {
    requests: u64,
    failures: Vec<(i128, String)>,
    answers: BTreeMap<(u64, u16), u64>,
}

impl Tally {
    fn answered_by(&self, gen: u64) -> u64 {
        self.answers
            .iter()
            .filter(|((g, _), _)| *g == gen)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Clients asking `GET /`, a new connection per request, until [`HttpLoad::finish`].
struct HttpLoad {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<Tally>>,
}

impl HttpLoad {
    fn start(port: u16, clients: usize) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let mut t = Tally::default();
                    while !stop.load(Ordering::SeqCst) && start.elapsed() < DEADLINE * 4 {
                        t.requests += 1;
                        match get(port, "/") {
                            Ok((status, body)) => match generation(&body) {
                                Some(gen) => *t.answers.entry((gen, status)).or_default() += 1,
                                // A cut answer: the headers and no body.
                                None => t.failures.push((now_ns(), format!("answer {status} {body:?}"))),
                            },
                            Err(e) => t.failures.push((now_ns(), e.to_string())),
                        }
                    }
                    t
                })
            })
            .collect();
        HttpLoad { stop, clients }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Tally::default();
        for c in self.clients {
            let t = c.join().unwrap();
            all.requests += t.requests;
            all.failures.extend(t.failures);
            for (k, n) in t.answers {
                *all.answers.entry(k).or_default() += n;
            }
        }
        all
    }
}

fn zdd_ok(z: &Zdd, args: &[&str]) -> String {
    let o = zdd(z, args);
    assert_eq!(o.status.code(), Some(0), "zdd {args:?}: {}{}", stderr(&o), z.log_text());
    stdout(&o)
}

fn stop_daemon(z: &Zdd) {
    zdd_ok(z, &["stop"]);
    wait_for("the master to be gone", DEADLINE, || {
        (!z.path("run/app.pid").exists()).then_some(())
    });
    z.assert_clean();
}

/// A daemon-mode config: `worker` is the `[worker]` body after `command`, `probe` the
/// `[worker.probe]` body (none if empty). `ready` is left to its default, "auto".
fn daemon(port: u16, command: &str, worker: &str, probe: &str) -> String {
    let probe = if probe.is_empty() {
        String::new()
    } else {
        format!("[worker.probe]\n{probe}\n")
    };
    format!(
        "[master]\nlog = \"{{dir}}/zdd.log\"\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\n\n\
         [worker]\ncommand = {command}\nstart_timeout = \"60s\"\nstop_timeout = \"20s\"\n{worker}\n\n{probe}\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    )
}

const PROBE: &str = "http = \"/healthz\"\ntimeout = \"5s\"\nretries = 3\nretry_delay = \"200ms\"";

/// A server under test.
struct Server<'a> {
    test: &'a str,
    /// `command` (a TOML list) and more `[worker]` keys of the good releases.
    command: String,
    worker: String,
    /// The good reload's `command`, if not the same.
    reload_command: Option<String>,
    /// The same for the bad release, whose `/healthz` answers 500 and whose `/` still serves.
    bad_command: String,
    bad_worker: String,
    /// The server's own graceful shutdown can fail a request it had accepted (hypercorn):
    /// such failures are allowed, and printed, only while the old generation shuts down.
    shutdown_drops: bool,
}

/// Start and reload with a probe under load, then a bad release whose probe fails.
fn probed(s: Server) {
    let port = free_port();
    let z = Zdd::new(&daemon(port, &s.command, &s.worker, PROBE));
    zdd_ok(&z, &["start"]);
    let first = z.started_pids()[0];
    let passed = z.records_with("probe passed");
    assert_eq!(passed.len(), 1, "{}", z.log_text());
    assert_eq!(passed[0]["pid"], first);
    let (status, body) = get(port, "/").unwrap();
    assert_eq!((status, generation(&body)), (200, Some(1)), "{body}");

    // (a) A good release: probed, committed, no request failed.
    let load = HttpLoad::start(port, 3);
    if let Some(command) = &s.reload_command {
        z.write_config(&daemon(port, command, &s.worker, PROBE));
    }
    let out = zdd_ok(&z, &["reload"]);
    assert!(out.contains("reloaded: generation 2 serving"), "{out}");
    let second = z.started_pids()[1];
    assert_eq!(z.records_with("probe passed")[1]["pid"], second);
    wait_for("an answer from generation 2", DEADLINE, || {
        let (status, body) = get(port, "/").expect("request failed");
        (status == 200 && generation(&body) == Some(2)).then_some(())
    });

    // (b) A bad release: /healthz answers 500.
    z.write_config(&daemon(port, &s.bad_command, &s.bad_worker, PROBE));
    let o = zdd(&z, &["reload"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}\n{}", z.log_text());
    let bad = *z.started_pids().last().unwrap();
    assert_ne!(bad, second);
    assert!(
        e.contains(&format!(
            "reload failed: probe GET /healthz on worker pid {bad}: status 500"
        )) && e.contains("(4 attempts)")
            && e.contains("generation 2 keeps serving"),
        "{e}"
    );
    // The bad release is asked to stop, not killed: it answers what it accepted before. Once
    // it is gone, generation 2 answers everything.
    wait_for("the bad release to be gone", DEADLINE, || (!alive(bad)).then_some(()));
    let (status, body) = get(port, "/").unwrap();
    assert_eq!((status, generation(&body)), (200, Some(2)), "{body}");
    let t = load.finish();
    assert_eq!(common::status(&z)["generation"], 2);

    // When each failure came: the old generation's shutdown (from the commit until it
    // exited), the bad release's own stop (from `reload failed` until it exited), or neither.
    let exited = |pid: i32| {
        z.records_with("worker exited")
            .into_iter()
            .find(|r| r["pid"] == pid)
            .map_or(i128::MAX, |r| ts_ns(&r) + 50_000_000)
    };
    // The first record whose message starts with `msg`.
    let at = |msg: &str| {
        z.records()
            .iter()
            .find(|r| r["msg"].as_str().is_some_and(|m| m.starts_with(msg)))
            .map_or(i128::MAX, ts_ns)
    };
    // The stop signal goes out in the step that logs `reload complete`, just before it.
    let old_stop = at("reload complete") - 10_000_000..=exited(first);
    // The stop signal goes out in the step that logs `reload failed`, just before the record.
    let bad_kill = at("reload failed") - 10_000_000..=exited(bad);
    let (mut during_stop, mut during_kill, mut other) = (vec![], vec![], vec![]);
    for (t, e) in &t.failures {
        let when = format!(
            "{e} ({:+.1} ms from `reload failed`)",
            (t - bad_kill.start()) as f64 / 1e6
        );
        if old_stop.contains(t) {
            during_stop.push(when);
        } else if bad_kill.contains(t) {
            during_kill.push(when);
        } else {
            other.push(when);
        }
    }
    let life = |pid: i32| {
        let started = z.records_with("worker started").into_iter().find(|r| r["pid"] == pid);
        let exited = z.records_with("worker exited").into_iter().find(|r| r["pid"] == pid);
        match (started, exited) {
            (Some(a), Some(b)) => format!("{:.0} ms", (ts_ns(&b) - ts_ns(&a)) as f64 / 1e6),
            _ => "?".into(),
        }
    };
    eprintln!(
        "MEASURE {}: {} requests, answers by (generation, status) {:?}; the bad release (generation 3) \
         answered {} while it lived {} (started to exited); failed: {} while generation 1 shut down \
         {during_stop:?}, {} while the bad release stopped {during_kill:?}, {} otherwise {other:?}",
        s.test,
        t.requests,
        t.answers,
        t.answered_by(3),
        life(bad),
        during_stop.len(),
        during_kill.len(),
        other.len(),
    );
    // The old generations lose nothing (but what a server's own graceful shutdown drops).
    assert!(
        s.shutdown_drops || during_stop.is_empty(),
        "failed while generation 1 shut down: {during_stop:?}"
    );
    // Nor does the failed release: it is asked to stop like any worker, never killed outright.
    assert!(
        s.shutdown_drops || during_kill.is_empty(),
        "failed while the bad release stopped: {during_kill:?}"
    );
    assert!(
        other.is_empty(),
        "{} of {} requests failed: {other:?}",
        other.len(),
        t.requests
    );
    assert!(t.answered_by(1) + t.answered_by(2) > 0, "{t:?}");
    // Every answer came from one of the three generations, and `/` never failed.
    assert!(
        t.answers
            .keys()
            .all(|&(g, status)| (1..=3).contains(&g) && status == 200),
        "{t:?}"
    );
    stop_daemon(&z);
}

fn health(status: u16) -> String {
    format!("env = {{ APP_HEALTH = \"{status}\" }}")
}

#[test]
fn hypercorn_serves_the_probe_with_one_bind_per_fd() {
    let test = "hypercorn_serves_the_probe_with_one_bind_per_fd";
    if !python_has("hypercorn") {
        return missing(test, "python3 -m hypercorn not importable (pip install hypercorn)");
    }
    let command =
        "[\"python3\", \"-m\", \"hypercorn\", \"--bind\", \"fd://3\", \"--bind\", \"fd://4\", \"asgi_app:app\"]"
            .to_string();
    probed(Server {
        test,
        command: command.clone(),
        worker: format!("cwd = \"{FIXTURES}\""),
        reload_command: None,
        bad_command: command,
        bad_worker: format!("cwd = \"{FIXTURES}\"\n{}", health(500)),
        shutdown_drops: true,
    });
}

#[test]
fn node_serves_the_probe_with_one_server_per_fd() {
    let test = "node_serves_the_probe_with_one_server_per_fd";
    if !runs("node", &["--version"]) {
        return missing(test, "node not installed (Debian package nodejs)");
    }
    let command = format!("[\"node\", \"{FIXTURES}/node_server.js\"]");
    probed(Server {
        test,
        command: command.clone(),
        worker: String::new(),
        reload_command: None,
        bad_command: command,
        bad_worker: health(500),
        shutdown_drops: false,
    });
}

#[test]
fn go_net_http_serves_the_probe_with_a_listener_per_fd() {
    let test = "go_net_http_serves_the_probe_with_a_listener_per_fd";
    if !runs("go", &["version"]) {
        return missing(test, "go not installed (Debian package golang-go)");
    }
    let out = tempfile::tempdir().unwrap();
    let command = format!("[\"{}\"]", build_go_server(out.path()).display());
    probed(Server {
        test,
        command: command.clone(),
        worker: String::new(),
        reload_command: None,
        bad_command: command,
        bad_worker: health(500),
        shutdown_drops: false,
    });
}

#[test]
fn puma_serves_the_probe_with_bind_to_activated_sockets() {
    let test = "puma_serves_the_probe_with_bind_to_activated_sockets";
    if !runs("puma", &["--version"]) {
        return missing(test, "puma not installed (Debian package puma)");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.ru"),
        "run ->(env) {\n\
         \x20 if env['PATH_INFO'] == '/healthz'\n\
         \x20   status = Integer(ENV.fetch('APP_HEALTH', '200'))\n\
         \x20   [status, {'content-type' => 'text/plain'}, [\"health #{status} from #{Process.pid}\\n\"]]\n\
         \x20 else\n\
         \x20   [200, {'content-type' => 'text/plain'}, [\"#{Process.pid} #{ENV['ZDD_GENERATION']}\\n\"]]\n\
         \x20 end\n\
         }\n",
    )
    .unwrap();
    let command = "[\"puma\", \"--bind-to-activated-sockets\", \"only\", \"config.ru\"]".to_string();
    let cwd = format!("cwd = \"{}\"", dir.path().display());
    probed(Server {
        test,
        command: command.clone(),
        worker: cwd.clone(),
        reload_command: None,
        bad_command: command,
        bad_worker: format!("{cwd}\n{}", health(500)),
        shutdown_drops: true,
    });
}

fn lighttpd() -> Option<&'static str> {
    ["/usr/sbin/lighttpd", "/usr/bin/lighttpd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

#[test]
fn lighttpd_serves_the_probe_with_socket_activation_alone() {
    let test = "lighttpd_serves_the_probe_with_socket_activation_alone";
    let Some(lighttpd) = lighttpd() else {
        return missing(test, "lighttpd not installed (Debian package lighttpd)");
    };
    // One document root per generation (lighttpd reads env.* in its config), so that answers
    // say which generation served them ("0" stands for the pid); /healthz a static file. The
    // bad release's config runs its /healthz as a CGI script that answers 500.
    let dir = tempfile::tempdir().unwrap();
    for gen in 1..=3 {
        let root = dir.path().join(format!("gen{gen}"));
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("index.txt"), format!("0 {gen}\n")).unwrap();
        let healthz = if gen < 3 {
            "ok\n"
        } else {
            "printf 'Status: 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nhealth 500\\n'\n"
        };
        std::fs::write(root.join("healthz"), healthz).unwrap();
    }
    let common = format!(
        "server.document-root = \"{}/gen\" + env.ZDD_GENERATION\n\
         server.systemd-socket-activation = \"enable\"\n\
         index-file.names = (\"index.txt\")\nmimetype.assign = (\".txt\" => \"text/plain\")\n",
        dir.path().display()
    );
    let conf = dir.path().join("lighttpd.conf");
    std::fs::write(&conf, &common).unwrap();
    let bad = dir.path().join("bad.conf");
    std::fs::write(
        &bad,
        format!("{common}server.modules += (\"mod_cgi\")\ncgi.assign = (\"/healthz\" => \"/bin/sh\")\n"),
    )
    .unwrap();
    let cmd = |conf: &Path| format!("[\"{lighttpd}\", \"-D\", \"-f\", \"{}\"]", conf.display());
    let worker = format!("cwd = \"{}\"\nstop_signal = \"INT\"", dir.path().display());
    probed(Server {
        test,
        command: cmd(&conf),
        worker: worker.clone(),
        reload_command: None,
        bad_command: cmd(&bad),
        bad_worker: worker,
        shutdown_drops: false,
    });
}

// ---- twisted and systemd-socket-proxyd -------------------------------------------------------

/// Start and reload (to `reload_command`) under load with the default `ready` and no probe:
/// both commit, no request fails (but what `shutdown_drops` allows while generation 1 stops).
fn unprobed(test: &str, command: &str, worker: &str, reload_command: &str, shutdown_drops: bool) {
    let port = free_port();
    let z = Zdd::new(&daemon(port, command, worker, ""));
    zdd_ok(&z, &["start"]);
    let first = z.started_pids()[0];
    let (status, body) = get(port, "/").unwrap();
    assert_eq!((status, generation(&body)), (200, Some(1)), "{body}");
    let load = HttpLoad::start(port, 3);
    z.write_config(&daemon(port, reload_command, worker, ""));
    let out = zdd_ok(&z, &["reload"]);
    assert!(out.contains("reloaded: generation 2 serving"), "{out}");
    wait_for("an answer from generation 2", DEADLINE, || {
        let (status, body) = get(port, "/").expect("request failed");
        (status == 200 && generation(&body) == Some(2)).then_some(())
    });
    wait_for("generation 1 to be gone", DEADLINE, || (!alive(first)).then_some(()));
    let t = load.finish();
    // From the stop signal (sent in the step that logs `reload complete`, just before it)
    // until generation 1 exited.
    let stop = z.records_with("reload complete").first().map_or(i128::MAX, ts_ns) - 10_000_000
        ..=z.records_with("worker exited")
            .into_iter()
            .find(|r| r["pid"] == first)
            .map_or(i128::MAX, |r| ts_ns(&r) + 50_000_000);
    let (during_stop, other): (Vec<_>, Vec<_>) = t
        .failures
        .iter()
        .map(|(t, e)| (*t, e.clone()))
        .partition(|(t, _)| stop.contains(t));
    let seen = z.records_with("worker listening");
    eprintln!(
        "MEASURE {test}: ready as {:?}; {} requests, answers by (generation, status) {:?}; failed: {} while generation 1 shut down {during_stop:?}, {} otherwise {other:?}",
        seen.iter()
            .map(|r| r["kind"].as_str().unwrap_or("?").to_string())
            .collect::<Vec<_>>(),
        t.requests,
        t.answers,
        during_stop.len(),
        other.len(),
    );
    assert!(other.is_empty(), "{} of {} failed: {other:?}", other.len(), t.requests);
    assert!(
        shutdown_drops || during_stop.is_empty(),
        "failed while generation 1 shut down: {during_stop:?}"
    );
    assert!(
        t.answers
            .keys()
            .all(|&(g, status)| (1..=2).contains(&g) && status == 200),
        "{t:?}"
    );
    stop_daemon(&z);
}

fn twist(listen: &[usize]) -> String {
    let mut args = vec!["python3".to_string(), "-m".into(), "twisted".into(), "web".into()];
    for i in listen {
        args.extend(["--listen".into(), format!("systemd:domain=INET:index={i}")]);
    }
    args.extend(["--wsgi".into(), "wsgi_app.app".into()]);
    toml_list(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn twisted_starts_and_reloads_with_the_default_ready() {
    let test = "twisted_starts_and_reloads_with_the_default_ready";
    if !python_has("twisted") {
        return missing(test, "python3 -m twisted not importable (pip install twisted)");
    }
    let command = twist(&[0]);
    unprobed(test, &command, &format!("cwd = \"{FIXTURES}\""), &command, true);
}

#[test]
fn twisted_serves_the_probe_with_one_listen_per_fd() {
    let test = "twisted_serves_the_probe_with_one_listen_per_fd";
    if !python_has("twisted") {
        return missing(test, "python3 -m twisted not importable (pip install twisted)");
    }
    let command = twist(&[0, 1]);
    probed(Server {
        test,
        command: command.clone(),
        worker: format!("cwd = \"{FIXTURES}\""),
        reload_command: None,
        bad_command: command,
        bad_worker: format!("cwd = \"{FIXTURES}\"\n{}", health(500)),
        shutdown_drops: true,
    });
}

/// A backend for systemd-socket-proxyd: answers `/` with "0 {label}" and `/healthz` with
/// `health`, one request per connection. Its port.
fn backend(label: u64, health: u16) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = if head.starts_with(b"GET /healthz ") {
                    (health, format!("health {health}\n"))
                } else {
                    (200, format!("0 {label}\n"))
                };
                let _ = write!(
                    s,
                    "HTTP/1.0 {status} Backend\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

fn socket_proxyd() -> Option<&'static str> {
    [
        "/lib/systemd/systemd-socket-proxyd",
        "/usr/lib/systemd/systemd-socket-proxyd",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

fn proxyd(program: &str, backend: u16) -> String {
    toml_list(&[program, &format!("127.0.0.1:{backend}")])
}

#[test]
fn systemd_socket_proxyd_starts_and_reloads_with_the_default_ready() {
    let test = "systemd_socket_proxyd_starts_and_reloads_with_the_default_ready";
    let Some(program) = socket_proxyd() else {
        return missing(test, "systemd-socket-proxyd not installed (Debian package systemd)");
    };
    // Each generation proxies to its own backend, whose answers name it.
    let (one, two) = (backend(1, 200), backend(2, 200));
    // It has no graceful stop: TERM closes the connections it is proxying.
    unprobed(test, &proxyd(program, one), "", &proxyd(program, two), true);
}

#[test]
fn systemd_socket_proxyd_passes_the_probe_to_its_backend() {
    let test = "systemd_socket_proxyd_passes_the_probe_to_its_backend";
    let Some(program) = socket_proxyd() else {
        return missing(test, "systemd-socket-proxyd not installed (Debian package systemd)");
    };
    let (one, two, three) = (backend(1, 200), backend(2, 200), backend(3, 500));
    probed(Server {
        test,
        command: proxyd(program, one),
        worker: String::new(),
        reload_command: Some(proxyd(program, two)),
        bad_command: proxyd(program, three),
        bad_worker: String::new(),
        // It has no graceful stop: TERM closes the connections it is proxying.
        shutdown_drops: true,
    });
}
