//! Test harness: runs the real `zdd` binary in its own temp dir, with the fixture worker, and
//! waits on events (log lines, files, pid changes) with generous deadlines, never bare sleeps.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous, for a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn zdd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_zdd"))
}

/// The fixture worker, built as an example next to the binary.
pub fn fixture() -> PathBuf {
    let p = zdd_bin().parent().unwrap().join("examples/fixture_worker");
    assert!(
        p.exists(),
        "{} missing: build with `cargo build --examples` (cargo test does)",
        p.display()
    );
    p
}

pub fn listenfd_server() -> PathBuf {
    zdd_bin().parent().unwrap().join("examples/listenfd_server")
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Poll `f` until it returns Some, or panic with `what` after the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

pub fn toml_list(args: &[&str]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

pub struct Zdd {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub status: Option<ExitStatus>,
}

impl Zdd {
    /// A temp dir with `app.toml` written from `body`, where `{dir}` is replaced by the temp dir
    /// and `{fixture}` by the fixture worker's path. Not started yet.
    pub fn new(body: &str) -> Zdd {
        let dir = tempfile::Builder::new().prefix("zdd-test-").tempdir().unwrap();
        let config = dir.path().join("app.toml");
        let z = Zdd {
            config,
            log: dir.path().join("zdd.log"),
            dir,
            child: None,
            status: None,
        };
        z.write_config(body);
        std::fs::create_dir_all(z.reports()).unwrap();
        z
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn reports(&self) -> PathBuf {
        self.path("reports")
    }

    pub fn write_config(&self, body: &str) {
        let text = body
            .replace("{dir}", self.dir.path().to_str().unwrap())
            .replace("{fixture}", fixture().to_str().unwrap());
        let header = if text.contains("[master]") {
            String::new()
        } else {
            "[master]\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\n\n".to_string()
        };
        // Write-then-rename, so a reload never reads a half-written file.
        let tmp = self.path("app.toml.tmp");
        std::fs::write(&tmp, format!("{header}{text}")).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(zdd_bin());
        c.args(args)
            .arg("-c")
            .arg(&self.config)
            .env("FIXTURE_REPORT_DIR", self.reports())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        c
    }

    /// Start `zdd start --foreground`, log to `zdd.log`.
    pub fn start(&mut self) -> &mut Self {
        self.start_with_env(&[])
    }

    /// Start with extra environment variables for the master.
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) -> &mut Self {
        let mut cmd = self.command(&["start", "--foreground"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.start_cmd(cmd)
    }

    /// Start the master from `cmd` (a `zdd start --foreground` the caller has set up: its
    /// user, its limits), with stdout and stderr to `zdd.log`.
    pub fn start_cmd(&mut self, mut cmd: Command) -> &mut Self {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.status = None;
        self
    }

    /// Start the master as nobody (which has no cgroups here): the temp dir readable by all,
    /// `reports/` writable by the workers, `run/` the master's own (nobody's, writable by no
    /// one else, as zdd requires of a runtime directory). Needs root.
    pub fn start_as_nobody(&mut self) -> &mut Self {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(self.reports(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir_all(self.path("run")).unwrap();
        std::os::unix::fs::chown(self.path("run"), Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&self.config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = self.command(&["start", "--foreground"]);
        cmd.uid(65534).gid(65534);
        self.start_cmd(cmd)
    }

    pub fn spawn(body: &str) -> Zdd {
        let mut z = Zdd::new(body);
        z.start();
        z
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every JSON record of the master's log (non-JSON lines are skipped).
    pub fn records(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn records_with(&self, msg: &str) -> Vec<Value> {
        self.records().into_iter().filter(|r| r["msg"] == msg).collect()
    }

    /// Wait until the log holds at least `n` records with this message.
    pub fn wait_msg_n(&mut self, msg: &str, n: usize) -> Vec<Value> {
        let what = format!("{n} log record(s) {msg:?}");
        let deadline = DEADLINE;
        let end = Instant::now() + deadline;
        loop {
            let found = self.records_with(msg);
            if found.len() >= n {
                return found;
            }
            if self.exited().is_some() {
                panic!("zdd exited while waiting for {what}; log:\n{}", self.log_text());
            }
            if Instant::now() > end {
                panic!("timed out waiting for {what}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn wait_msg(&mut self, msg: &str) -> Value {
        self.wait_msg_n(msg, 1).remove(0)
    }

    /// Wait for a record whose message contains `needle`.
    pub fn wait_msg_containing(&mut self, needle: &str) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(r) = self
                .records()
                .into_iter()
                .find(|r| r["msg"].as_str().is_some_and(|m| m.contains(needle)))
            {
                return r;
            }
            if Instant::now() > end {
                panic!(
                    "timed out waiting for a log message containing {needle:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn wait_ready(&mut self) -> Value {
        self.wait_msg("ready")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Send SIGHUP and wait for the `n`th "reload complete".
    pub fn reload(&mut self, n: usize) -> Value {
        self.signal(nix::sys::signal::Signal::SIGHUP);
        self.wait_msg_n("reload complete", n).remove(n - 1)
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                self.status = c.try_wait().unwrap();
            }
        }
        self.status
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            if Instant::now() > end {
                panic!("zdd did not exit; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Graceful stop through SIGTERM; asserts exit 0 and that nothing is left behind.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let st = self.wait_exit();
        assert_eq!(st.code(), Some(0), "zdd exit status; log:\n{}", self.log_text());
        self.assert_clean();
    }

    /// Worker pids that zdd logged as started.
    pub fn started_pids(&self) -> Vec<i32> {
        self.records_with("worker started")
            .iter()
            .map(|r| r["pid"].as_i64().unwrap() as i32)
            .collect()
    }

    /// No runtime files (pid file, sockets) left in `run/`, and no worker alive. A daemon's
    /// default log file (`<stem>.log`) is no runtime file: the log outlives the master.
    pub fn assert_clean(&self) {
        let run = self.path("run");
        if run.exists() {
            let left: Vec<_> = std::fs::read_dir(&run)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| !n.to_string_lossy().ends_with(".log"))
                .collect();
            assert!(left.is_empty(), "left behind in run/: {left:?}");
        }
        for pid in self.started_pids() {
            wait_for(&format!("worker {pid} to be gone"), DEADLINE, || {
                (!alive(pid)).then_some(())
            });
        }
    }

    /// The fixture's report for `pid`.
    pub fn report(&self, pid: i32) -> Value {
        let p = self.reports().join(format!("report-{pid}.json"));
        let text = wait_for(&format!("report of {pid}"), DEADLINE, || {
            std::fs::read_to_string(&p).ok()
        });
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Zdd {
    fn drop(&mut self) {
        // A daemonized master of a test that failed: kill it (its workers follow, through
        // PR_SET_PDEATHSIG), so that nothing outlives the test.
        if self.child.is_none() {
            if let Some(pid) = std::fs::read_to_string(self.path("run/app.pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if self.exited().is_none() {
            let pids = self.started_pids();
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
                for pid in pids {
                    let _ =
                        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Connect, read the fixture's "<pid> <generation>" answer (the body of an HTTP answer, with
/// `--http-status`).
pub fn ask(addr: SocketAddr) -> std::io::Result<(i32, u64)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = match out.split_once("\r\n\r\n") {
        Some((_, body)) if out.starts_with("HTTP/") => body,
        _ => &out,
    };
    let mut it = body.split_whitespace();
    let pid = it.next().and_then(|p| p.parse().ok());
    let gen = it.next().and_then(|g| g.parse().ok());
    match (pid, gen) {
        (Some(p), Some(g)) => Ok((p, g)),
        _ => Err(std::io::Error::other(format!("bad answer {out:?}"))),
    }
}

pub fn ask_unix(path: &Path) -> std::io::Result<(i32, u64)> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let mut it = out.split_whitespace();
    Ok((it.next().unwrap().parse().unwrap(), it.next().unwrap().parse().unwrap()))
}

/// Ask until the answer comes from generation `gen` (an old worker that was just told to stop
/// may still answer a request or two while it finishes). Connection errors fail at once.
pub fn ask_gen(addr: SocketAddr, gen: u64) -> i32 {
    wait_for(&format!("an answer from generation {gen}"), DEADLINE, || {
        let (pid, g) = ask(addr).expect("connection failed");
        (g == gen).then_some(pid)
    })
}

// Daemon-mode helpers: `zdd` commands against a master started with `zdd start`.

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config for daemon mode: the master logs to a file in the temp dir.
pub fn daemon_config(port: u16, args: &[&str], worker_extra: &str) -> String {
    format!(
        "[master]\nlog = \"{{dir}}/zdd.log\"\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\n\n\
         [worker]\ncommand = {}\nstop_timeout = \"10s\"\n{worker_extra}\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&[&["{fixture}"], args].concat())
    )
}

pub fn zdd(z: &Zdd, args: &[&str]) -> std::process::Output {
    z.command(args).output().unwrap()
}

pub fn status(z: &Zdd) -> serde_json::Value {
    let o = zdd(z, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// Clients opening a new connection per request, in threads, until [`Load::finish`] (or four
/// deadlines, whichever comes first).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<std::thread::JoinHandle<LoadResult>>,
}

#[derive(Default)]
pub struct LoadResult {
    pub requests: u64,
    /// Each failed request, with the time since the load started.
    pub failures: Vec<String>,
    /// (generation, pid) of every answer.
    pub seen: std::collections::BTreeSet<(u64, i32)>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let mut r = LoadResult::default();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) && start.elapsed() < DEADLINE * 4 {
                        match ask(addr) {
                            Ok((pid, gen)) => {
                                r.seen.insert((gen, pid));
                            }
                            Err(e) => r.failures.push(format!("{:?}: {e}", start.elapsed())),
                        }
                        r.requests += 1;
                    }
                    r
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stop the clients and add up what they saw; asserts that no request failed.
    pub fn finish(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut total = LoadResult::default();
        for c in self.clients {
            let r = c.join().unwrap();
            total.requests += r.requests;
            total.failures.extend(r.failures);
            total.seen.extend(r.seen);
        }
        assert!(
            total.failures.is_empty(),
            "{} of {} connections failed: {:?}",
            total.failures.len(),
            total.requests,
            &total.failures[..total.failures.len().min(10)]
        );
        total
    }
}

/// Whether the pipe whose read end is `fd` is full: within a page of what it can hold (a
/// pipe counts its room in pages, so a writer may be refused with less than that queued).
pub fn pipe_full(fd: std::os::fd::RawFd) -> bool {
    let mut queued: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer; F_GETPIPE_SZ takes no argument.
    let (r, size) = unsafe {
        (
            nix::libc::ioctl(fd, nix::libc::FIONREAD, &mut queued),
            nix::libc::fcntl(fd, nix::libc::F_GETPIPE_SZ),
        )
    };
    r == 0 && size > 0 && queued + 4096 >= size
}

// Real servers (tests/listening.rs, tests/servers_probe.rs).

/// A prerequisite is missing: say so loudly, or fail when running under CI.
pub fn missing(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why} (CI is set: a missing prerequisite is a failure; run .ci/install-deps)"
    );
    // Straight to fd 2, not through eprintln!: the test harness captures that and shows it
    // only for failing tests, so a skip would pass unseen.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED {test}: {why} (run .ci/install-deps) ***"
    );
}

/// Whether `program args` runs and exits 0.
pub fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn python_has(module: &str) -> bool {
    runs("python3", &["-c", &format!("import {module}")])
}

/// Build tests/fixtures/go_server.go into `dir`; its path.
pub fn build_go_server(dir: &Path) -> PathBuf {
    let gohome = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go");
    let server = dir.join("go_server");
    let build = Command::new("go")
        .args(["build", "-o"])
        .arg(&server)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/go_server.go"))
        .env("GOCACHE", gohome.join("cache"))
        .env("GOPATH", gohome.join("path"))
        .env("GO111MODULE", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap();
    assert!(build.status.success(), "go build failed:\n{}", stderr(&build));
    server
}

/// Unix time in ns of a log record's `ts` (`2026-11-25T14:51:40.156034384Z`).
pub fn ts_ns(r: &serde_json::Value) -> i128 {
    let ts = r["ts"].as_str().unwrap();
    let (date, time) = ts.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    // Days since the epoch (Howard Hinnant's days_from_civil).
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    let frac_ns: i128 = format!("{frac:0<9}")[..9].parse().unwrap();
    i128::from(days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1_000_000_000 + frac_ns
}

pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}
