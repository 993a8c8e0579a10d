//! Trustworthy cut-over through the real binary: rolling reloads (slot by slot, rolled back on
//! failure) and the watch after a cut-over (`stable_after`), under load.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

fn config(port: u16, args: &[&str], worker_extra: &str) -> String {
    format!(
        "[worker]\ncommand = {}\ncount = 4\nstop_timeout = \"10s\"\n{worker_extra}\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&[&["{fixture}"], args].concat())
    )
}

const ROLLING: &str = "reload = \"rolling\"\nmax_surge = 1";

/// Workers of `status` that serve or are about to: neither stopping nor gone.
fn live(s: &serde_json::Value) -> Vec<(u64, u64, i64)> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| matches!(w["state"].as_str(), Some("starting" | "probing" | "ready")))
        .map(|w| {
            (
                w["generation"].as_u64().unwrap(),
                w["slot"].as_u64().unwrap(),
                w["pid"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_rolling_reload_replaces_the_slots_one_at_a_time_under_load() {
    let port = free_port();
    let mut z = Zdd::spawn(&config(port, &["--ready-after", "150", "--serve"], ROLLING));
    z.wait_ready();
    let load = Load::start(format!("127.0.0.1:{port}").parse().unwrap(), 2);
    let mut reload = z
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While it rolls, never more than count + max_surge workers that serve or start.
    let mut most = 0;
    let done = loop {
        if let Some(st) = reload.try_wait().unwrap() {
            break st;
        }
        let o = zdd(&z, &["status", "--json"]);
        if let Ok(s) = serde_json::from_str::<serde_json::Value>(&stdout(&o)) {
            most = most.max(live(&s).len());
        }
    };
    let out = reload.wait_with_output().unwrap();
    assert!(done.success(), "{}", stdout(&out));
    assert!(most <= 5, "{most} workers alive at once");
    let replaced = z.records_with("slot replaced");
    let order: Vec<u64> = replaced.iter().map(|r| r["slot"].as_u64().unwrap()).collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
    let text = stdout(&out);
    assert!(text.contains("slot 4 of 4 replaced"), "{text}");
    assert!(text.contains("reloaded: generation 2 serving (4 workers)"), "{text}");
    let s = status(&z);
    let gens: BTreeSet<u64> = live(&s).iter().map(|w| w.0).collect();
    assert_eq!(gens, BTreeSet::from([2]));
    let r = load.finish();
    eprintln!("{} requests, 0 failed, max {most} live workers", r.requests);
    z.stop();
}

#[test]
fn a_rolling_reload_whose_third_slot_fails_rolls_back_the_first_two_under_load() {
    let port = free_port();
    let mut z = Zdd::spawn(&config(port, &["--ready", "--serve"], ROLLING));
    z.wait_ready();
    let before: BTreeSet<i64> = live(&status(&z)).iter().map(|w| w.2).collect();
    let load = Load::start(format!("127.0.0.1:{port}").parse().unwrap(), 2);
    z.write_config(&config(port, &["--ready", "--serve", "--fail-slot", "2"], ROLLING));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("reload failed: rolled back after slot 2 of 4: worker pid")
            && err.contains("exited with status 1 during start-up")
            && err.contains("generation 1 keeps serving"),
        "{err}"
    );
    assert!(
        err.contains("failing in slot 2"),
        "the failed worker's last lines: {err}"
    );
    // Slots 0 and 1 serve from generation 1 again (new workers), 2 and 3 never changed.
    let s = status(&z);
    let after = live(&s);
    assert_eq!(s["generation"], 1);
    assert_eq!(after.len(), 4, "{s}");
    assert!(after.iter().all(|w| w.0 == 1), "{s}");
    let kept: BTreeSet<i64> = after.iter().filter(|w| w.1 >= 2).map(|w| w.2).collect();
    assert!(kept.is_subset(&before), "slots 2 and 3 were never touched: {s}");
    let fresh = after.iter().filter(|w| w.1 < 2 && !before.contains(&w.2)).count();
    assert_eq!(
        fresh, 2,
        "slots 0 and 1 were rolled back to new generation-1 workers: {s}"
    );
    // Every generation-2 worker is gone.
    wait_for("generation 2 gone", DEADLINE, || {
        let s = status(&z);
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["generation"] == 1)
            .then_some(())
    });
    let r = load.finish();
    eprintln!("{} requests, 0 failed", r.requests);
    z.stop();
}

#[test]
fn a_new_generation_that_stops_serving_right_after_its_cut_over_keeps_the_old_one_draining() {
    let port = free_port();
    let once = "{dir}/ready-once";
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = {}\nstop_timeout = \"1s\"\nstable_after = \"60s\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&["{fixture}", "--ready", "--ignore-term"])
    ));
    z.wait_ready();
    let old = live(&status(&z))[0].2;
    // The new release is ready once, dies 300 ms later, and its restarts are never ready.
    z.write_config(&format!(
        "[worker]\ncommand = {}\nstop_timeout = \"1s\"\nstable_after = \"60s\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&["{fixture}", "--ready-once", once, "--exit-after", "300", "1"])
    ));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let since = Instant::now();
    let m = z.wait_msg_containing("stopped serving within 1m of its cut-over");
    assert!(
        m["msg"]
            .as_str()
            .unwrap()
            .contains("generation 1 is kept draining until one serves"),
        "{m}"
    );
    // Well past the old worker's stop timeout (1 s): three crash restarts of the new one.
    z.wait_msg_n("worker exited unexpectedly; restarting", 3);
    assert!(since.elapsed() > Duration::from_secs(1));
    assert!(
        alive(old as i32),
        "the old worker was killed although no new one serves"
    );
    let s = status(&z);
    assert!(
        s["unstable"].as_str().unwrap().contains("generation 2 stopped serving"),
        "{s}"
    );
    let text = stdout(&zdd(&z, &["status"]));
    assert!(text.contains("UNSTABLE generation 2 stopped serving"), "{text}");
    z.stop();
    assert!(!alive(old as i32));
}

/// HTTP clients, a new connection per request, until [`HttpLoad::finish`]: every answer must
/// be a 200.
struct HttpLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl HttpLoad {
    fn start(port: u16, clients: usize) -> HttpLoad {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    let (mut n, mut failed) = (0u64, Vec::new());
                    let start = Instant::now();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) && start.elapsed() < DEADLINE * 4 {
                        let answer = (|| -> std::io::Result<String> {
                            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
                            s.set_read_timeout(Some(Duration::from_secs(20)))?;
                            s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
                            let mut out = String::new();
                            s.read_to_string(&mut out)?;
                            Ok(out)
                        })();
                        match answer {
                            Ok(a) if a.starts_with("HTTP/1.") && a.contains(" 200 ") => {}
                            Ok(a) => failed.push(format!("{:?}: {a:?}", start.elapsed())),
                            Err(e) => failed.push(format!("{:?}: {e}", start.elapsed())),
                        }
                        n += 1;
                    }
                    (n, failed)
                })
            })
            .collect();
        HttpLoad { stop, clients }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (mut n, mut failed) = (0, Vec::new());
        for c in self.clients {
            let (k, f) = c.join().unwrap();
            n += k;
            failed.extend(f);
        }
        assert!(
            failed.is_empty(),
            "{} of {n} requests failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        n
    }
}

fn have_gunicorn() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import gunicorn"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing(
            "a gunicorn rolling reload",
            "python3 -m gunicorn not importable (pip install gunicorn)",
        );
    }
    ok
}

fn gunicorn_rolling(port: u16, env: &str) -> String {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    format!(
        "[worker]\ncommand = [\"python3\", \"-m\", \"gunicorn\", \"--workers\", \"1\", \"--preload\", \"--chdir\", \"{fixtures}\", \"wsgi_slot_app:app\"]\n\
         count = 3\nreload = \"rolling\"\nstart_timeout = \"60s\"\nstop_timeout = \"20s\"\n{env}\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    )
}

#[test]
fn gunicorn_rolling_reload_rolls_back_a_release_broken_in_one_slot_under_load() {
    if !have_gunicorn() {
        return;
    }
    let port = free_port();
    let mut z = Zdd::spawn(&gunicorn_rolling(port, ""));
    z.wait_ready();
    let load = HttpLoad::start(port, 2);
    z.write_config(&gunicorn_rolling(port, "env = { FAIL_IN_SLOT = \"1\" }"));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("reload failed: rolled back after slot 1 of 3: worker pid"),
        "{err}"
    );
    assert!(err.contains("broken release in slot 1"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    let s = status(&z);
    assert_eq!(s["generation"], 1);
    let gens: Vec<u64> = live(&s).iter().map(|w| w.0).collect();
    assert_eq!(gens, vec![1, 1, 1], "{s}");
    // A good release then rolls through.
    z.write_config(&gunicorn_rolling(port, ""));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("slot 3 of 3 replaced"), "{}", stdout(&o));
    let n = load.finish();
    eprintln!("{n} requests, 0 failed");
    z.stop();
}

#[test]
fn a_failed_reload_lets_its_new_workers_finish_the_requests_they_accepted() {
    // The new release takes connections from the shared socket while it is probed, answers
    // each after 200 ms, and fails its probe (500). Killing it outright would cut the
    // requests it holds; it is asked to stop like any worker.
    let port = free_port();
    let probe = "\n[worker.probe]\nhttp = \"/healthz\"\nretries = 2\nretry_delay = \"100ms\"\n";
    let conf = |args: &[&str]| {
        format!(
            "[worker]\ncommand = {}\ncount = 2\nstop_timeout = \"10s\"\n{probe}\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
            toml_list(&[&["{fixture}"], args].concat())
        )
    };
    let mut z = Zdd::spawn(&conf(&["--ready", "--serve", "--http-status", "200"]));
    z.wait_ready();
    let load = Load::start(format!("127.0.0.1:{port}").parse().unwrap(), 4);
    z.write_config(&conf(&[
        "--ready",
        "--serve",
        "--http-status",
        "500",
        "--answer-delay",
        "200",
    ]));
    for _ in 0..2 {
        let o = zdd(&z, &["reload"]);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert!(stderr(&o).contains("status 500"), "{}", stderr(&o));
    }
    let r = load.finish();
    eprintln!("{} requests, 0 failed", r.requests);
    z.stop();
}
