//! `cargo bench --bench ready_modes`: the reload round trip of one app under each `ready`
//! mode, what a look at a starting worker costs (`ready = "listening"`), and the master's CPU
//! per reload. Prints numbers; asserts nothing (docs/benchmarks.md keeps them).
//!
//! The app is the test fixture serving on its listener (`--serve`: a blocking accept loop),
//! with `--ready` where the mode takes READY=1 (sent at once). A reload's round trip is the time
//! from SIGHUP to the master's "reload complete" record on its stderr.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn build_fixture() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "--example", "fixture_worker"])
        .status()
        .expect("cargo build");
    assert!(st.success());
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_zdd"));
    exe.parent().unwrap().join("examples/fixture_worker")
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Start a master with this `[worker]` tail, reload it `reloads` times; prints one line.
fn run(name: &str, fixture: &Path, args: &str, worker: &str, reloads: usize) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[master]\nlog_format = \"json\"\ncontrol_socket = \"run/bench.sock\"\n\
             [worker]\ncommand = [\"{}\", \"--serve\"{args}]\nstop_timeout = \"10s\"\n{worker}\n\
             [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
            fixture.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_zdd"))
        .args(["start", "--foreground", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    let mut looks = Vec::new();
    let mut wait_for = |msg: &str| loop {
        let v = rx.recv().expect("master exited");
        if v["msg"] == "worker listening" {
            looks.push((v["look_us"].as_u64().unwrap(), v["looks"].as_u64().unwrap()));
        }
        if v["msg"] == msg {
            return;
        }
        assert!(
            !v["msg"].as_str().is_some_and(|m| m.starts_with("reload failed")),
            "{v}"
        );
    };
    wait_for("ready");
    let master = nix::unistd::Pid::from_raw(pid as i32);
    let cpu0 = cpu_ticks(pid);
    let mut times = Vec::with_capacity(reloads);
    for _ in 0..reloads {
        let t0 = Instant::now();
        nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGHUP).unwrap();
        wait_for("reload complete");
        times.push(t0.elapsed());
    }
    let cpu = cpu_ticks(pid) - cpu0;
    nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGTERM).unwrap();
    let _ = child.wait();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as f64;
    let mut look_us: Vec<u64> = looks.iter().map(|l| l.0).collect();
    look_us.sort_unstable();
    let per_worker: Vec<u64> = looks.iter().map(|l| l.1).collect();
    let looks_txt = if look_us.is_empty() {
        String::new()
    } else {
        format!(
            "; last look median {} us, p90 {} us; looks per worker {:.1}",
            percentile(&look_us, 0.5),
            percentile(&look_us, 0.9),
            per_worker.iter().sum::<u64>() as f64 / per_worker.len() as f64
        )
    };
    println!(
        "{name:<28} {reloads:>4} reloads: median {:.2} ms, p90 {:.2} ms, max {:.2} ms; master CPU {:.2} ms/reload{looks_txt}",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.9)),
        ms(*times.last().unwrap()),
        cpu as f64 / hz * 1e3 / reloads as f64,
    );
}

fn main() {
    let reloads: usize = std::env::var("ZDD_BENCH_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let fixture = build_fixture();
    run(
        "notify (READY=1 at once)",
        &fixture,
        ", \"--ready\"",
        "ready = \"notify\"",
        reloads,
    );
    run("listening", &fixture, "", "ready = \"listening\"", reloads);
    run(
        "auto (READY=1 at once)",
        &fixture,
        ", \"--ready\"",
        "ready = \"auto\"",
        reloads,
    );
    run("auto (no READY=1)", &fixture, "", "ready = \"auto\"", reloads);
    run(
        "delay 1s (the default)",
        &fixture,
        "",
        "ready = \"delay\"",
        reloads.div_ceil(20),
    );
}
