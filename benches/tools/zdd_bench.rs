//! `zdd-bench`: zero-downtime under load, for zdd and for its peers, with the same worker and
//! the same load.
//!
//! For each supervisor it starts the test fixture worker (`--serve`, which answers every
//! connection with "<pid> <generation>") behind it, runs an open-loop load that opens a new
//! connection per request at a fixed rate, lets it run steady, then drives reloads (and, for
//! zdd, upgrades) back to back, and records every request: when it started, how long it took,
//! whether it failed and how. It prints a summary per supervisor and a comparison table, writes
//! the raw series to CSV files and renders a PNG plot (requests/s and failures over time, with
//! the reload marks) through `benches/tools/plot.py`.
//!
//! A reload counts as done when the old worker received its SIGTERM (the fixture writes the
//! moment from its signal handler to the FIXTURE_EVENTS file), for every supervisor alike.
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/zdd-bench [--reloads 1000] [--upgrades 100] [--peer-reloads 100]
//!     [--rate 500] [--steady 3] [--supervisors zdd,server_starter,circus] [--out DIR]
//! ```
//! A supervisor that is not installed (start_server from libserver-starter-perl, circusd from
//! PyPI's circus) is skipped with a printed reason.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// CLOCK_MONOTONIC in nanoseconds: the clock of the fixture's event lines.
fn mono_ns() -> u64 {
    let mut ts = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Options {
    reloads: usize,
    upgrades: usize,
    peer_reloads: usize,
    rate: u32,
    steady: Duration,
    supervisors: Vec<String>,
    out: PathBuf,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter().position(|a| a == name).map(|i| {
            args.get(i + 1)
                .cloned()
                .unwrap_or_else(|| die(&format!("{name} needs a value")))
        })
    };
    let num = |name: &str, default: usize| {
        get(name).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| die(&format!("{name}: not a number: {v}")))
        })
    };
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: zdd-bench [--reloads N] [--upgrades N] [--peer-reloads N] [--rate REQ_PER_S] [--steady SECS] [--supervisors zdd,server_starter,circus] [--out DIR]");
        std::process::exit(0);
    }
    let here = std::env::current_exe().unwrap();
    let target = here.parent().unwrap().parent().unwrap().to_path_buf();
    Options {
        reloads: num("--reloads", 1000),
        upgrades: num("--upgrades", 100),
        peer_reloads: num("--peer-reloads", 100),
        rate: num("--rate", 500) as u32,
        steady: Duration::from_secs(num("--steady", 3) as u64),
        supervisors: get("--supervisors")
            .unwrap_or_else(|| "zdd,server_starter,circus".into())
            .split(',')
            .map(str::to_string)
            .collect(),
        out: get("--out").map_or_else(|| target.join("zdd-bench"), PathBuf::from),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("zdd-bench: {msg}");
    std::process::exit(2)
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// Load

/// One request: when it started (ns after the run's start), how long it took, how it ended.
#[derive(Clone)]
struct Sample {
    start_ns: u64,
    latency_us: u64,
    error: Option<String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Sample>>>,
}

const LOAD_THREADS: u32 = 8;

impl Load {
    /// `rate` requests per second in all, each a new connection, open loop: every thread keeps
    /// its own schedule whatever the answers take.
    fn start(addr: SocketAddr, rate: u32, t0: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let per_thread = Duration::from_secs_f64(LOAD_THREADS as f64 / rate as f64);
        let threads = (0..LOAD_THREADS)
            .map(|k| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut samples = Vec::new();
                    let mut next = Instant::now() + per_thread.mul_f64(k as f64 / LOAD_THREADS as f64);
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += per_thread;
                        let start = mono_ns();
                        let error = request(addr).err();
                        samples.push(Sample {
                            start_ns: start - t0,
                            latency_us: (mono_ns() - start) / 1000,
                            error,
                        });
                    }
                    samples
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Sample> = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_by_key(|s| s.start_ns);
        all
    }
}

/// Connect, read the worker's one-line answer to EOF, check it.
fn request(addr: SocketAddr) -> Result<(), String> {
    let limit = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| format!("read: {e}"))?;
    match answer.split_whitespace().next().map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(()),
        _ => Err(format!("bad answer {answer:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Worker events

/// The fixture's event lines: pid → (what → monotonic ns).
struct Events {
    path: PathBuf,
    read: usize,
    by_pid: HashMap<u32, HashMap<String, u64>>,
}

impl Events {
    fn new(path: PathBuf) -> Events {
        std::fs::write(&path, "").unwrap();
        Events {
            path,
            read: 0,
            by_pid: HashMap::new(),
        }
    }

    fn refresh(&mut self) {
        use std::io::{Seek, SeekFrom};
        // Read only what was appended since the last time.
        let mut text = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            let _ = f
                .seek(SeekFrom::Start(self.read as u64))
                .and_then(|_| f.read_to_end(&mut text));
        }
        // Only whole lines: a line being written is read next time.
        let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if end == 0 {
            return;
        }
        for line in String::from_utf8_lossy(&text[..end]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [pid, what, ns] = f[..] {
                if let (Ok(pid), Ok(ns)) = (pid.parse(), ns.parse()) {
                    self.by_pid.entry(pid).or_default().insert(what.to_string(), ns);
                }
            }
        }
        self.read += end;
    }

    fn get(&self, pid: u32, what: &str) -> Option<u64> {
        self.by_pid.get(&pid)?.get(what).copied()
    }

    /// Workers that started and were not yet told to stop.
    fn live(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .by_pid
            .iter()
            .filter(|(_, e)| e.contains_key("start") && !e.contains_key("term"))
            .map(|(p, _)| *p)
            .collect();
        v.sort();
        v
    }

    /// Wait until `pred` holds, re-reading the file; false at the deadline.
    fn wait(&mut self, deadline: Duration, mut pred: impl FnMut(&Events) -> bool) -> bool {
        let end = Instant::now() + deadline;
        loop {
            self.refresh();
            if pred(self) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Supervisors

/// Issue one reload (`false`) or upgrade (`true`) in the run's directory.
type ReloadFn = Box<dyn Fn(&Path, bool) -> Result<(), String>>;
/// Stop the supervisor and wait for it.
type StopFn = Box<dyn Fn(&Path, &mut Child)>;

struct Supervisor {
    name: &'static str,
    child: Child,
    dir: PathBuf,
    /// Issue one reload (or upgrade); returns once the command returned.
    reload: ReloadFn,
    stop: StopFn,
}

fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let o = cmd.stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?}: {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

fn start_zdd(dir: &Path, zdd: &Path, fixture: &Path, port: u16) -> Supervisor {
    let config = dir.join("zdd.toml");
    std::fs::write(
        &config,
        format!(
            "[master]\npid_file = \"{d}/zdd.pid\"\ncontrol_socket = \"{d}/zdd.sock\"\nlog = \"{d}/zdd.log\"\n\n\
             [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n\n\
             [worker]\ncommand = [\"{f}\", \"--serve\", \"--ready\"]\nready = \"notify\"\nstop_timeout = \"10s\"\n",
            d = dir.display(),
            f = fixture.display()
        ),
    )
    .unwrap();
    let child = Command::new(zdd)
        .args(["start", "--foreground", "-c"])
        .arg(&config)
        .env("FIXTURE_EVENTS", dir.join("events"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let zdd = zdd.to_path_buf();
    let zdd2 = zdd.clone();
    Supervisor {
        name: "zdd",
        child,
        dir: dir.to_path_buf(),
        reload: Box::new(move |dir, upgrade| {
            run_quiet(
                Command::new(&zdd)
                    .arg(if upgrade { "upgrade" } else { "reload" })
                    .arg("-c")
                    .arg(dir.join("zdd.toml")),
            )
        }),
        stop: Box::new(move |dir, child| {
            let _ = run_quiet(Command::new(&zdd2).arg("stop").arg("-c").arg(dir.join("zdd.toml")));
            let _ = child.wait();
        }),
    }
}

fn start_server_starter(dir: &Path, fixture: &Path, port: u16) -> Option<Supervisor> {
    let exe = which("start_server")?;
    let child = Command::new(&exe)
        .arg(format!("--port=127.0.0.1:{port}"))
        .arg(format!("--pid-file={}", dir.join("ss.pid").display()))
        .arg(format!("--status-file={}", dir.join("ss.status").display()))
        .arg("--")
        .arg(fixture)
        .arg("--serve")
        .env("FIXTURE_EVENTS", dir.join("events"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("ss.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("ss.err")).unwrap())
        .spawn()
        .unwrap();
    Some(Supervisor {
        name: "server_starter",
        child,
        dir: dir.to_path_buf(),
        // `start_server --restart` sends SIGHUP and waits until the old generation is gone.
        reload: Box::new(move |dir, _| {
            run_quiet(
                Command::new(&exe)
                    .arg("--restart")
                    .arg(format!("--pid-file={}", dir.join("ss.pid").display()))
                    .arg(format!("--status-file={}", dir.join("ss.status").display())),
            )
        }),
        stop: Box::new(|_, child| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }),
    })
}

fn start_circus(dir: &Path, fixture: &Path, port: u16) -> Option<Supervisor> {
    let circusd = which("circusd")?;
    let circusctl = which("circusctl")?;
    let endpoint = format!("ipc://{}/circus.sock", dir.display());
    let ini = dir.join("circus.ini");
    std::fs::write(
        &ini,
        format!(
            "[circus]\nendpoint = {endpoint}\npubsub_endpoint = ipc://{d}/pubsub.sock\nstats_endpoint = ipc://{d}/stats.sock\nstatsd = False\n\n\
             [watcher:app]\ncmd = {f} --serve --fd $(circus.sockets.app)\nuse_sockets = True\nnumprocesses = 1\ncopy_env = True\ngraceful_timeout = 10\n\n\
             [socket:app]\nhost = 127.0.0.1\nport = {port}\n",
            d = dir.display(),
            f = fixture.display()
        ),
    )
    .unwrap();
    let child = Command::new(circusd)
        .arg(&ini)
        .env("FIXTURE_EVENTS", dir.join("events"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("circus.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("circus.err")).unwrap())
        .spawn()
        .unwrap();
    let ctl = move |args: &[&str]| run_quiet(Command::new(&circusctl).arg("--endpoint").arg(&endpoint).args(args));
    let ctl = Arc::new(ctl);
    let ctl2 = Arc::clone(&ctl);
    Some(Supervisor {
        name: "circus",
        child,
        dir: dir.to_path_buf(),
        reload: Box::new(move |_, _| ctl(&["reload", "app"])),
        stop: Box::new(move |_, child| {
            let _ = ctl2(&["quit"]);
            let _ = child.wait();
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// One run

struct Reload {
    upgrade: bool,
    t0_ns: u64,
    /// The command returned.
    returned_ns: u64,
    /// The old worker got SIGTERM (an upgrade keeps the worker: equal to `returned_ns`).
    done_ns: u64,
    /// The new worker's ready (or, without readiness, start) to the old worker's SIGTERM.
    handover_ns: Option<u64>,
    error: Option<String>,
}

struct Run {
    name: &'static str,
    samples: Vec<Sample>,
    reloads: Vec<Reload>,
    steady_end_ns: u64,
    end_ns: u64,
}

fn run(mut sup: Supervisor, port: u16, o: &Options, reloads: usize, upgrades: usize) -> Result<Run, String> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut events = Events::new(sup.dir.join("events"));
    let started = Instant::now();
    while request(addr).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            (sup.stop)(&sup.dir, &mut sup.child);
            return Err(format!("{} did not start serving within 30 s", sup.name));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    events.refresh();
    let t0 = mono_ns();
    let load = Load::start(addr, o.rate, t0);
    std::thread::sleep(o.steady);
    let steady_end_ns = mono_ns() - t0;
    let mut marks = Vec::new();
    let total = reloads + upgrades;
    for i in 0..total {
        let upgrade = i >= reloads;
        events.refresh();
        let old = events.live();
        let start = mono_ns();
        let result = (sup.reload)(&sup.dir, upgrade);
        let returned = mono_ns();
        let mut r = Reload {
            upgrade,
            t0_ns: start - t0,
            returned_ns: returned - t0,
            done_ns: returned - t0,
            handover_ns: None,
            error: result.err(),
        };
        if !upgrade && r.error.is_none() {
            let gone = events.wait(Duration::from_secs(30), |e| {
                old.iter().all(|p| e.get(*p, "term").is_some()) && !e.live().is_empty()
            });
            if !gone {
                r.error = Some("the old worker was not signalled within 30 s".into());
            } else {
                let term = old.iter().filter_map(|p| events.get(*p, "term")).max().unwrap();
                r.done_ns = term.max(start) - t0;
                let new = events.live();
                let ready = new
                    .iter()
                    .filter_map(|p| events.get(*p, "ready").or_else(|| events.get(*p, "start")))
                    .max();
                r.handover_ns = ready.map(|t| term.saturating_sub(t));
            }
        }
        if let Some(e) = &r.error {
            eprintln!("{}: {} {i}: {e}", sup.name, if upgrade { "upgrade" } else { "reload" });
        }
        marks.push(r);
        if i % 100 == 99 {
            eprintln!("{}: {} of {total} done", sup.name, i + 1);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let end_ns = mono_ns() - t0;
    (sup.stop)(&sup.dir, &mut sup.child);
    Ok(Run {
        name: sup.name,
        samples,
        reloads: marks,
        steady_end_ns,
        end_ns,
    })
}

// ---------------------------------------------------------------------------------------------
// Numbers

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e6)
}

struct Summary {
    name: &'static str,
    reloads: usize,
    upgrades: usize,
    failed_reloads: usize,
    requests: usize,
    failed: usize,
    steady_p50_us: u64,
    steady_p99_us: u64,
    around_p99_us: u64,
    round_trip_p50_ns: u64,
    round_trip_p99_ns: u64,
    handover_p50_ns: u64,
    handover_p99_ns: u64,
    upgrade_p50_ns: u64,
}

fn summarize(r: &Run, out: &Path) -> Summary {
    // Requests that started while a reload was under way, or within 10 ms after it was done.
    let windows: Vec<(u64, u64)> = r.reloads.iter().map(|m| (m.t0_ns, m.done_ns + 10_000_000)).collect();
    let in_window = |t: u64| {
        let i = windows.partition_point(|w| w.0 <= t);
        i > 0 && t <= windows[i - 1].1
    };
    let mut steady: Vec<u64> = r
        .samples
        .iter()
        .filter(|s| s.error.is_none() && s.start_ns < r.steady_end_ns)
        .map(|s| s.latency_us)
        .collect();
    let mut around: Vec<u64> = r
        .samples
        .iter()
        .filter(|s| s.error.is_none() && in_window(s.start_ns))
        .map(|s| s.latency_us)
        .collect();
    steady.sort();
    around.sort();
    let reloads: Vec<&Reload> = r.reloads.iter().filter(|m| !m.upgrade && m.error.is_none()).collect();
    let mut round: Vec<u64> = reloads.iter().map(|m| m.done_ns - m.t0_ns).collect();
    let mut hand: Vec<u64> = reloads.iter().filter_map(|m| m.handover_ns).collect();
    let mut upg: Vec<u64> = r
        .reloads
        .iter()
        .filter(|m| m.upgrade && m.error.is_none())
        .map(|m| m.returned_ns - m.t0_ns)
        .collect();
    round.sort();
    hand.sort();
    upg.sort();
    let failures: Vec<&Sample> = r.samples.iter().filter(|s| s.error.is_some()).collect();

    // Series for the plot: per 100 ms, answered and failed requests; and the reload marks.
    let bucket = 100_000_000u64;
    // Whole buckets only: a last partial one would look like a drop in throughput.
    let buckets = r.end_ns / bucket;
    let mut series: BTreeMap<u64, (u64, u64)> = (0..buckets).map(|b| (b, (0, 0))).collect();
    for s in r.samples.iter().filter(|s| s.start_ns / bucket < buckets) {
        let e = series.entry(s.start_ns / bucket).or_default();
        if s.error.is_some() {
            e.1 += 1
        } else {
            e.0 += 1
        }
    }
    let mut csv = String::from("t_s,ok_per_s,failed\n");
    for (b, (ok, failed)) in &series {
        csv += &format!("{:.1},{},{}\n", *b as f64 / 10.0, ok * 10, failed);
    }
    std::fs::write(out.join(format!("{}-series.csv", r.name)), csv).unwrap();
    let mut marks = String::from("t_s,kind,round_trip_ms,error\n");
    for m in &r.reloads {
        marks += &format!(
            "{:.4},{},{},{}\n",
            m.t0_ns as f64 / 1e9,
            if m.upgrade { "upgrade" } else { "reload" },
            ms(m.done_ns - m.t0_ns),
            m.error.as_deref().unwrap_or("").replace([',', '\n'], " ")
        );
    }
    std::fs::write(out.join(format!("{}-reloads.csv", r.name)), marks).unwrap();
    let mut fails = String::from("t_s,error\n");
    for s in &failures {
        fails += &format!("{:.4},{}\n", s.start_ns as f64 / 1e9, s.error.as_deref().unwrap_or(""));
    }
    std::fs::write(out.join(format!("{}-failures.csv", r.name)), fails).unwrap();

    let sum = Summary {
        name: r.name,
        reloads: r.reloads.iter().filter(|m| !m.upgrade).count(),
        upgrades: r.reloads.iter().filter(|m| m.upgrade).count(),
        failed_reloads: r.reloads.iter().filter(|m| m.error.is_some()).count(),
        requests: r.samples.len(),
        failed: failures.len(),
        steady_p50_us: pct(&steady, 0.5),
        steady_p99_us: pct(&steady, 0.99),
        around_p99_us: pct(&around, 0.99),
        round_trip_p50_ns: pct(&round, 0.5),
        round_trip_p99_ns: pct(&round, 0.99),
        handover_p50_ns: pct(&hand, 0.5),
        handover_p99_ns: pct(&hand, 0.99),
        upgrade_p50_ns: pct(&upg, 0.5),
    };
    println!("== {} ==", r.name);
    println!(
        "  {} reloads ({} failed), {} upgrades, over {:.1} s",
        sum.reloads,
        sum.failed_reloads,
        sum.upgrades,
        r.end_ns as f64 / 1e9
    );
    println!(
        "  requests: {} sent, {} failed{}",
        sum.requests,
        sum.failed,
        failures
            .iter()
            .take(5)
            .map(|s| format!(
                "\n    at {:.3} s: {}",
                s.start_ns as f64 / 1e9,
                s.error.as_deref().unwrap_or("")
            ))
            .collect::<String>()
    );
    println!(
        "  latency: steady p50 {} us, p99 {} us; around reloads p99 {} us ({} requests)",
        sum.steady_p50_us,
        sum.steady_p99_us,
        sum.around_p99_us,
        around.len()
    );
    println!(
        "  reload round trip (command to old worker's SIGTERM): median {} ms, p99 {} ms",
        ms(sum.round_trip_p50_ns),
        ms(sum.round_trip_p99_ns)
    );
    println!(
        "  new worker ready (or started) to old worker signalled: median {} ms, p99 {} ms",
        ms(sum.handover_p50_ns),
        ms(sum.handover_p99_ns)
    );
    if sum.upgrades > 0 {
        println!("  upgrade round trip: median {} ms", ms(sum.upgrade_p50_ns));
    }
    sum
}

fn table(sums: &[Summary]) -> String {
    let base = &sums[0];
    let ratio = |a: u64, b: u64| {
        if b == 0 {
            "-".to_string()
        } else {
            format!("{:.1}×", a as f64 / b as f64)
        }
    };
    let mut t = String::from(
        "| supervisor | reloads | failed requests | reload round trip median (p99) | ready→old signalled median | p99 latency steady / around reloads | round trip vs zdd |\n|---|---|---|---|---|---|---|\n",
    );
    for s in sums {
        t += &format!(
            "| {} | {} | {} of {} | {} ms ({} ms) | {} ms | {} / {} µs | {} |\n",
            s.name,
            s.reloads,
            s.failed,
            s.requests,
            ms(s.round_trip_p50_ns),
            ms(s.round_trip_p99_ns),
            ms(s.handover_p50_ns),
            s.steady_p99_us,
            s.around_p99_us,
            ratio(s.round_trip_p50_ns, base.round_trip_p50_ns),
        );
    }
    t
}

fn main() {
    let o = options();
    let here = std::env::current_exe().unwrap();
    let examples = here.parent().unwrap();
    let fixture = examples.join("fixture_worker");
    let zdd = examples.parent().unwrap().join("zdd");
    for (what, p) in [("fixture worker", &fixture), ("zdd", &zdd)] {
        if !p.is_file() {
            die(&format!(
                "no {what} at {}: run `cargo build --release --bins --examples` first",
                p.display()
            ));
        }
    }
    std::fs::create_dir_all(&o.out).unwrap();
    let mut sums = Vec::new();
    for name in &o.supervisors {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (sup, reloads, upgrades) = match name.as_str() {
            "zdd" => (Some(start_zdd(dir.path(), &zdd, &fixture, port)), o.reloads, o.upgrades),
            "server_starter" => (start_server_starter(dir.path(), &fixture, port), o.peer_reloads, 0),
            "circus" => (start_circus(dir.path(), &fixture, port), o.peer_reloads, 0),
            other => die(&format!("unknown supervisor {other:?} (zdd, server_starter, circus)")),
        };
        let Some(sup) = sup else {
            println!("== {name} == skipped: not installed (start_server: apt install libserver-starter-perl; circusd: pip install circus)");
            continue;
        };
        eprintln!(
            "{name}: {reloads} reloads, {upgrades} upgrades at {} requests/s",
            o.rate
        );
        match run(sup, port, &o, reloads, upgrades) {
            Ok(r) => sums.push(summarize(&r, &o.out)),
            Err(e) => println!("== {name} == failed: {e}"),
        }
        let _ = std::io::stdout().flush();
    }
    if sums.is_empty() {
        return;
    }
    let t = table(&sums);
    println!("\n{t}");
    std::fs::write(o.out.join("table.md"), &t).unwrap();
    let plot = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/tools/plot.py");
    let names: Vec<&str> = sums.iter().map(|s| s.name).collect();
    match Command::new("python3").arg(&plot).arg(&o.out).args(&names).status() {
        Ok(s) if s.success() => println!("plot: {}", o.out.join("zdd-bench.png").display()),
        Ok(s) => println!("plot: not rendered ({s}; needs python3-matplotlib)"),
        Err(e) => println!("plot: not rendered ({e})"),
    }
}
