//! `ready = "listening"` with real servers that never send `READY=1`, through the real `zdd`
//! binary: each must be seen waiting on its listener, start, reload under load and survive a
//! broken release with 0 failed requests. A missing server skips its test loudly, and fails
//! it when `CI` is set.
//!
//! Each test also prints a `MEASURE` line (not an assertion): how long after its start the
//! worker was seen listening, and when the first request was answered compared with that
//! (`cargo test --test listening -- --nocapture`; docs/servers.md keeps the numbers).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// One HTTP/1.0 request; the answer's last line is "<pid> <generation>".
fn http_ask(port: u16) -> std::io::Result<(i32, u64)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let bad = || std::io::Error::other(format!("bad answer {out:?}"));
    if !(out.starts_with("HTTP/1.") && out.lines().next().is_some_and(|l| l.contains(" 200"))) {
        return Err(bad());
    }
    let mut it = out.trim_end().lines().last().ok_or_else(bad)?.split_whitespace();
    let pid = it.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let gen = it.next().and_then(|g| g.parse().ok()).ok_or_else(bad)?;
    Ok((pid, gen))
}

/// One client's requests, failures (unix time in ns, error) and the (generation, pid) of its
/// answers.
type ClientResult = (u64, Vec<(i128, String)>, Vec<(u64, i32)>);

/// Clients sending one HTTP request per connection until stopped; every failure is kept.
struct HttpLoad {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<ClientResult>>,
}

impl HttpLoad {
    fn start(port: u16, clients: usize) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let (mut n, mut failed, mut seen) = (0, Vec::new(), Vec::new());
                    while !stop.load(Ordering::SeqCst) && start.elapsed() < DEADLINE * 4 {
                        match http_ask(port) {
                            Ok(a) if !seen.contains(&(a.1, a.0)) => seen.push((a.1, a.0)),
                            Ok(_) => {}
                            Err(e) => failed.push((now_ns(), e.to_string())),
                        }
                        n += 1;
                    }
                    (n, failed, seen)
                })
            })
            .collect();
        HttpLoad { stop, clients }
    }

    /// Stop. Returns (requests, failures, generations answered).
    fn finish(self) -> (u64, Vec<(i128, String)>, Vec<u64>) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut total, mut failures, mut gens) = (0, Vec::new(), Vec::new());
        for c in self.clients {
            let (n, f, seen) = c.join().unwrap();
            total += n;
            failures.extend(f);
            gens.extend(seen.into_iter().map(|(g, _)| g));
        }
        gens.sort_unstable();
        gens.dedup();
        (total, failures, gens)
    }
}

/// A server under test: its command (a TOML list), its working directory, more `[worker]`
/// keys, and a command for a release that fails to start.
struct Server<'a> {
    test: &'a str,
    command: String,
    cwd: &'a str,
    extra: &'a str,
    broken: Option<String>,
    /// The server's own graceful shutdown can fail a request it had accepted (uvicorn and
    /// hypercorn close a connection whose request they have not read yet, or cut a response):
    /// such failures are allowed, and printed, only while the old generation shuts down.
    shutdown_drops: bool,
}

fn config(s: &Server, command: &str, port: u16) -> String {
    format!(
        "[worker]\ncommand = {command}\ncwd = \"{}\"\nready = \"listening\"\nstart_timeout = \"60s\"\nstop_timeout = \"20s\"\n{}\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        s.cwd, s.extra
    )
}

/// Start, reload under load, fail a broken release under load, stop; print the measurements.
fn listening_server(s: Server) {
    let port = free_port();
    let mut z = Zdd::new(&config(&s, &s.command, port));
    // From before the start, a client asks until the first answer: when was it served?
    let first: Arc<Mutex<Option<i128>>> = Arc::default();
    let asker = {
        let first = Arc::clone(&first);
        std::thread::spawn(move || {
            let end = Instant::now() + DEADLINE * 2;
            while Instant::now() < end {
                if http_ask(port).is_ok() {
                    *first.lock().unwrap() = Some(now_ns());
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    z.start();
    z.wait_ready();
    asker.join().unwrap();
    let seen = z.wait_msg("worker listening");
    let started = ts_ns(&z.records_with("worker started")[0]);
    let ready = ts_ns(&z.records_with("worker ready")[0]);
    let first = first.lock().unwrap().expect("generation 1 never answered");
    let ms = |ns: i128| ns as f64 / 1e6;
    eprintln!(
        "MEASURE {}: seen by {} ({}) {:.1} ms after spawn, {} looks; first request answered {:+.1} ms after ready",
        s.test,
        seen["kind"],
        seen["syscall"],
        ms(ready - started),
        seen["looks"],
        ms(first - ready)
    );
    // Seen well before start_timeout (60s), by one of the three kinds of evidence.
    assert!(seen["after_ms"].as_u64().unwrap() < 30_000, "{seen}");
    assert!(
        ["epoll", "accept", "poll"].contains(&seen["kind"].as_str().unwrap()),
        "{seen}"
    );
    assert_eq!(http_ask(port).unwrap().1, 1);

    let load = HttpLoad::start(port, 3);
    z.reload(1);
    wait_for("an answer from generation 2", DEADLINE, || {
        (http_ask(port).expect("request failed").1 == 2).then_some(())
    });
    assert_eq!(z.records_with("worker listening").len(), 2, "{}", z.log_text());
    if let Some(broken) = &s.broken {
        z.write_config(&config(&s, broken, port));
        z.signal(nix::sys::signal::Signal::SIGHUP);
        z.wait_msg_containing("reload failed: worker pid");
        assert_eq!(http_ask(port).unwrap().1, 2, "generation 2 keeps serving");
    }
    let (requests, failures, gens) = load.finish();
    // The old generation's shutdown: from its stop signal (the commit) until it exited.
    let old = z.records_with("worker started")[0]["pid"].clone();
    let stop_window = (
        ts_ns(&z.records_with("reload complete")[0]),
        z.records_with("worker exited")
            .iter()
            .find(|r| r["pid"] == old)
            .map_or(i128::MAX, |r| ts_ns(r) + 50_000_000),
    );
    let (during_shutdown, other): (Vec<_>, Vec<_>) = failures
        .iter()
        .partition(|(t, _)| s.shutdown_drops && (stop_window.0..=stop_window.1).contains(t));
    if !during_shutdown.is_empty() {
        eprintln!(
            "\n*** {}: {} of {requests} requests failed while the old server shut down (its own graceful \
             shutdown; see docs/servers.md): {during_shutdown:?} ***\n",
            s.test,
            during_shutdown.len()
        );
    }
    assert!(
        other.is_empty(),
        "{} of {requests} requests failed: {other:?}; old generation stopping {stop_window:?}; log:\n{}",
        other.len(),
        z.log_text()
    );
    assert!(
        requests > 0 && gens.contains(&2),
        "{requests} requests, generations {gens:?}"
    );
    assert!(!gens.contains(&3), "the broken generation answered: {gens:?}");
    z.stop();
}

#[test]
fn uvicorn_is_seen_listening_and_reloads_without_ready_1() {
    let test = "uvicorn_is_seen_listening_and_reloads_without_ready_1";
    if !python_has("uvicorn") {
        return missing(test, "python3 -m uvicorn not importable (pip install uvicorn)");
    }
    let cmd = |app: &str| format!("[\"python3\", \"-m\", \"uvicorn\", \"--fd\", \"3\", \"{app}\"]");
    listening_server(Server {
        test,
        command: cmd("asgi_app:app"),
        cwd: FIXTURES,
        extra: "",
        broken: Some(cmd("no_such_module_zdd:app")),
        shutdown_drops: true,
    });
}

#[test]
fn hypercorn_is_seen_listening_and_reloads_without_ready_1() {
    let test = "hypercorn_is_seen_listening_and_reloads_without_ready_1";
    if !python_has("hypercorn") {
        return missing(test, "python3 -m hypercorn not importable (pip install hypercorn)");
    }
    let cmd = |app: &str| format!("[\"python3\", \"-m\", \"hypercorn\", \"--bind\", \"fd://3\", \"{app}\"]");
    listening_server(Server {
        test,
        command: cmd("asgi_app:app"),
        cwd: FIXTURES,
        extra: "",
        broken: Some(cmd("no_such_module_zdd:app")),
        shutdown_drops: true,
    });
}

#[test]
fn node_is_seen_listening_and_reloads_without_ready_1() {
    let test = "node_is_seen_listening_and_reloads_without_ready_1";
    if !runs("node", &["--version"]) {
        return missing(test, "node not installed (Debian package nodejs)");
    }
    listening_server(Server {
        test,
        command: format!("[\"node\", \"{FIXTURES}/node_server.js\"]"),
        cwd: FIXTURES,
        extra: "",
        broken: Some("[\"node\", \"-e\", \"require('./no_such_module_zdd')\"]".into()),
        shutdown_drops: false,
    });
}

#[test]
fn go_net_http_is_seen_listening_and_reloads() {
    // go_server.go also sends READY=1, which ready = "listening" ignores.
    let test = "go_net_http_is_seen_listening_and_reloads";
    if !runs("go", &["version"]) {
        return missing(test, "go not installed (Debian package golang-go)");
    }
    let out = tempfile::tempdir().unwrap();
    let server = build_go_server(out.path());
    listening_server(Server {
        test,
        command: format!("[\"{}\"]", server.display()),
        cwd: FIXTURES,
        extra: "",
        // No LISTEN_FDS for it to take: it exits 1 at once.
        broken: Some(format!(
            "[\"/usr/bin/env\", \"-u\", \"LISTEN_FDS\", \"{}\"]",
            server.display()
        )),
        shutdown_drops: false,
    });
}

#[test]
fn lighttpd_is_seen_listening_and_reloads() {
    let test = "lighttpd_is_seen_listening_and_reloads";
    let Some(lighttpd) = ["/usr/sbin/lighttpd", "/usr/bin/lighttpd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        return missing(test, "lighttpd not installed (Debian package lighttpd)");
    };
    // One document root per generation (lighttpd reads env.* in its config), so that answers
    // say which generation served them; "0" stands for the pid.
    let dir = tempfile::tempdir().unwrap();
    for gen in 1..=3 {
        let root = dir.path().join(format!("gen{gen}"));
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("index.txt"), format!("0 {gen}\n")).unwrap();
    }
    let conf = dir.path().join("lighttpd.conf");
    std::fs::write(
        &conf,
        format!(
            "server.document-root = \"{}/gen\" + env.ZDD_GENERATION\n\
             server.systemd-socket-activation = \"enable\"\n\
             index-file.names = (\"index.txt\")\nmimetype.assign = (\".txt\" => \"text/plain\")\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let broken = dir.path().join("broken.conf");
    std::fs::write(
        &broken,
        "server.no-such-directive-zdd = \"x\"\nthis is not lighttpd config\n",
    )
    .unwrap();
    let cwd = dir.path().display().to_string();
    listening_server(Server {
        test,
        command: format!("[\"{lighttpd}\", \"-D\", \"-f\", \"{}\"]", conf.display()),
        cwd: &cwd,
        // TERM drops connections in flight; INT is lighttpd's graceful shutdown.
        extra: "stop_signal = \"INT\"",
        broken: Some(format!("[\"{lighttpd}\", \"-D\", \"-f\", \"{}\"]", broken.display())),
        shutdown_drops: false,
    });
}

#[test]
fn puma_is_seen_listening_and_reloads() {
    let test = "puma_is_seen_listening_and_reloads";
    if !runs("puma", &["--version"]) {
        return missing(test, "puma not installed (Debian package puma)");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.ru"),
        "run ->(env) { [200, {\"content-type\" => \"text/plain\"}, [\"#{Process.pid} #{ENV['ZDD_GENERATION']}\\n\"]] }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("broken.ru"), "require 'no_such_gem_zdd'\n").unwrap();
    let cwd = dir.path().display().to_string();
    let cmd = |ru: &str| format!("[\"puma\", \"--bind-to-activated-sockets\", \"only\", \"{ru}\"]");
    listening_server(Server {
        test,
        command: cmd("config.ru"),
        cwd: &cwd,
        extra: "",
        broken: Some(cmd("broken.ru")),
        shutdown_drops: false,
    });
}

/// A fixture worker config with `ready` and more `[worker]` keys.
fn fixture_config(port: u16, args: &[&str], worker: &str) -> String {
    format!(
        "[worker]\ncommand = {}\nstop_timeout = \"10s\"\n{worker}\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&[&["{fixture}"], args].concat())
    )
}

fn context_switches(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn a_master_whose_worker_was_seen_listening_stays_asleep() {
    // Once the worker is ready no look is due: the master sleeps in poll without a timeout.
    // (A look left behind would wake it at least 20 times a second.)
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--serve"], "ready = \"listening\""));
    z.wait_ready();
    let seen = z.wait_msg("worker listening");
    assert_eq!(
        (seen["kind"].as_str(), seen["syscall"].as_str()),
        (Some("poll"), Some("poll")),
        "{seen}"
    );
    ask_gen(format!("127.0.0.1:{port}").parse().unwrap(), 1);
    let before = context_switches(z.pid());
    // A window to observe, not a synchronisation: nothing is waited for here.
    std::thread::sleep(Duration::from_secs(1));
    let woke = context_switches(z.pid()) - before;
    assert!(woke < 5, "the idle master woke {woke} times in 1 s");
    z.stop();
}

#[test]
fn ready_1_is_ignored_under_listening_and_the_timeout_says_what_was_not_seen() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(
        port,
        &["--ready"],
        "ready = \"listening\"\nstart_timeout = \"1s\"",
    ));
    let failed = z.wait_msg_containing("did not become ready within 1s");
    let msg = failed["msg"].as_str().unwrap();
    assert!(msg.contains("it was not seen waiting on its listeners"), "{msg}");
    assert!(msg.contains("set ready = \"notify\" or \"delay\""), "{msg}");
    assert!(z.records_with("worker listening").is_empty());
    assert_ne!(z.wait_exit().code(), Some(0));
}

#[test]
fn auto_takes_ready_1_from_a_worker_that_never_listens() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--ready"], "ready = \"auto\""));
    z.wait_ready();
    assert!(z.records_with("worker listening").is_empty());
    z.stop();
}

#[test]
fn auto_takes_listening_from_a_worker_that_never_sends_ready_1() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--serve"], "ready = \"auto\""));
    z.wait_ready();
    z.wait_msg("worker listening");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    ask_gen(addr, 1);
    let load = Load::start(addr, 2);
    z.reload(1);
    ask_gen(addr, 2);
    load.finish();
    z.stop();
}

#[test]
fn the_notify_timeout_names_the_other_modes() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(
        port,
        &["--serve"],
        "ready = \"notify\"\nstart_timeout = \"500ms\"",
    ));
    let failed = z.wait_msg_containing("did not become ready within 500ms");
    let msg = failed["msg"].as_str().unwrap();
    assert!(
        msg.contains("if the server never sends READY=1, set ready = \"listening\" (or \"auto\")"),
        "{msg}"
    );
    assert_ne!(z.wait_exit().code(), Some(0));
}

#[test]
fn by_default_a_serving_worker_is_ready_without_ready_1_and_a_silent_one_gets_a_hint() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--serve"], ""));
    z.wait_ready();
    ask(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    z.stop();
    // Neither READY=1 nor listening (the fixture without --serve only waits for SIGTERM).
    let mut z = Zdd::spawn(&fixture_config(free_port(), &[], "start_timeout = \"500ms\""));
    let failed = z.wait_msg_containing("did not become ready within 500ms");
    let msg = failed["msg"].as_str().unwrap();
    assert!(
        msg.contains("neither sent READY=1 nor was seen waiting on its listeners")
            && msg.contains("in the foreground (not daemonized)"),
        "{msg}"
    );
    assert_ne!(z.wait_exit().code(), Some(0));
}
