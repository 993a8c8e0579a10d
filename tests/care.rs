//! Long-running care through the real binary: the worker watchdog and recycling
//! (`max_lifetime`, `max_rss`), under load where it matters.

mod common;

use common::*;

fn config(port: u16, args: &[&str], worker_extra: &str) -> String {
    format!(
        "[worker]\ncommand = {}\nstop_timeout = \"5s\"\n{worker_extra}\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&[&["{fixture}"], args].concat())
    )
}

fn ready_pids(z: &Zdd) -> Vec<i64> {
    status(z)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| w["pid"].as_i64().unwrap())
        .collect()
}

#[test]
fn a_worker_that_stops_pinging_its_watchdog_is_replaced_and_one_that_pings_is_kept() {
    let port = free_port();
    // Slot 0 pings for 1.5 s, then hangs (its thread stops); the watchdog is 1 s.
    let mut z = Zdd::spawn(&config(
        port,
        &[
            "--ready",
            "--serve",
            "--watchdog-ping",
            "100",
            "--watchdog-stop",
            "1500",
        ],
        "watchdog = \"1s\"",
    ));
    z.wait_ready();
    let first = ready_pids(&z)[0];
    let r = z.report(first as i32);
    assert_eq!(r["env"]["WATCHDOG_USEC"], "1000000", "{r}");
    assert_eq!(r["env"]["WATCHDOG_PID"], first.to_string(), "{r}");
    let m = z.wait_msg_containing("watchdog expired (no WATCHDOG=1 for 1s); replacing it");
    assert_eq!(m["pid"], first);
    // Well over a second after it became ready: it pinged until 1.5 s, so it was kept that long.
    let ready_at = z.records_with("worker ready")[0]["ts"].as_str().unwrap().to_string();
    assert!(m["ts"].as_str().unwrap() > ready_at.as_str());
    // Its slot restarts; the new worker serves.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("a new worker serving", DEADLINE, || {
        ask(addr).ok().filter(|(pid, _)| i64::from(*pid) != first)
    });
    z.stop();
}

#[test]
fn watchdog_trigger_replaces_the_worker_at_once() {
    // A shell worker: systemd-notify sends from the worker's process group.
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"/bin/sh\", \"-c\", \"systemd-notify --ready; sleep 0.3; systemd-notify WATCHDOG=trigger; exec sleep 1000\"]\n\
         watchdog = \"1h\"\nready = \"notify\"\nstop_timeout = \"2s\"\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    z.wait_msg_containing("WATCHDOG=trigger; replacing it");
    z.stop();
}

#[test]
fn max_lifetime_recycles_one_slot_at_a_time_under_load() {
    let port = free_port();
    let mut z = Zdd::spawn(&config(
        port,
        &["--ready", "--serve"],
        "count = 2\nmax_lifetime = \"1s\"",
    ));
    z.wait_ready();
    let before = ready_pids(&z);
    let load = Load::start(format!("127.0.0.1:{port}").parse().unwrap(), 2);
    let recycled = wait_for("two workers recycled", DEADLINE, || {
        let r: Vec<_> = z
            .records()
            .into_iter()
            .filter(|r| {
                r["msg"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("worker recycled: max_lifetime 1s reached")
            })
            .collect();
        (r.len() >= 2).then_some(r)
    });
    let old: Vec<i64> = recycled.iter().map(|r| r["old_pid"].as_i64().unwrap()).collect();
    for p in &before {
        assert!(old.contains(p), "{p} not recycled: {recycled:?}");
    }
    // One at a time: the second recycle started after the first ended.
    let starts: Vec<_> = z
        .records()
        .into_iter()
        .filter(|r| r["msg"].as_str().unwrap_or("").starts_with("recycling worker"))
        .collect();
    assert!(starts[1]["ts"].as_str().unwrap() >= recycled[0]["ts"].as_str().unwrap());
    let r = load.finish();
    eprintln!("{} requests, 0 failed", r.requests);
    z.stop();
}

#[test]
fn a_max_rss_below_the_apps_size_backs_off_instead_of_recycling_in_a_loop() {
    let port = free_port();
    let mut z = Zdd::spawn(&config(port, &["--ready", "--serve"], "max_rss = \"1MiB\""));
    z.wait_ready();
    let pid = ready_pids(&z)[0];
    let m = z.wait_msg_containing("max_rss 1.0MiB is below what this app needs");
    assert!(
        m["msg"].as_str().unwrap().contains("not recycling for memory for 1m"),
        "{m}"
    );
    assert!(!z.log_text().contains("recycling worker"));
    assert_eq!(ready_pids(&z), vec![pid]);
    let s = status(&z);
    assert!(s["workers"][0]["rss_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    z.stop();
}

#[test]
fn bad_care_values_are_refused_with_their_position() {
    for (line, key, msg) in [
        ("watchdog = \"0s\"", "worker.watchdog", "must be longer than 0s"),
        ("max_rss = \"12 parsecs\"", "worker.max_rss", "unknown unit"),
        ("max_rss = \"10KiB\"", "worker.max_rss", "between 1MiB and 1TiB"),
        (
            "recycle_jitter = \"1m\"",
            "worker.recycle_jitter",
            "only used with max_lifetime",
        ),
        (
            "max_lifetime = \"2d\"",
            "worker.max_lifetime",
            "longer than the maximum of 24h",
        ),
    ] {
        let z = Zdd::new(&config(free_port(), &["--ready"], line));
        let o = zdd(&z, &["check"]);
        assert_eq!(o.status.code(), Some(2), "{line}");
        let err = stderr(&o);
        assert!(
            err.contains("app.toml:") && err.contains(key) && err.contains(msg),
            "{line}: {err}"
        );
    }
}

#[test]
fn a_watchdog_shorter_than_the_boot_is_armed_only_once_the_worker_is_ready() {
    let port = free_port();
    // Boots in 800 ms, pings every 100 ms once ready; the watchdog is 300 ms.
    let mut z = Zdd::spawn(&config(
        port,
        &["--ready-after", "800", "--serve", "--watchdog-ping", "100"],
        "watchdog = \"300ms\"",
    ));
    z.wait_ready();
    // A reload boots another one the same way, and commits.
    z.reload(1);
    z.wait_msg("reload complete");
    assert!(!z.log_text().contains("watchdog expired"), "{}", z.log_text());
    z.stop();
}
