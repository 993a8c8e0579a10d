//! Servers nobody here wrote, behind zdd: they must accept the sockets zdd passes (each checks
//! LISTEN_PID in its own way), serve, and survive reloads. A missing runtime skips the test
//! with a printed reason.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The generation in the body of the app's answer.
fn generation_of(response: &str) -> u64 {
    assert!(
        response.starts_with("HTTP/1.") && response.contains(" 200 "),
        "{response}"
    );
    response.trim_end().rsplit(' ').next().unwrap().parse().unwrap()
}

fn have_gunicorn() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import gunicorn"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn gunicorn_serves_and_reloads() {
    if !have_gunicorn() {
        missing(
            "gunicorn_serves_and_reloads",
            "python3 -m gunicorn not importable (pip install gunicorn)",
        );
        return;
    }
    let port = free_port();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"python3\", \"-m\", \"gunicorn\", \"--workers\", \"2\", \"--chdir\", \"{fixtures}\", \"wsgi_app:app\"]\n\
         start_timeout = \"60s\"\nstop_timeout = \"20s\"\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    assert!(z.log_text().contains("Listening at: "), "{}", z.log_text());
    assert_eq!(generation_of(&http_get(port).unwrap()), 1);
    for gen in 2..=3 {
        z.reload(gen as usize - 1);
        // The old arbiter drains gracefully and may answer once more; no request may fail.
        wait_for(&format!("gunicorn of generation {gen}"), DEADLINE, || {
            (generation_of(&http_get(port).expect("request failed")) == gen).then_some(())
        });
    }
    z.stop();
}

#[test]
fn rust_listenfd_server_serves_and_reloads() {
    let server = listenfd_server();
    assert!(server.exists(), "{} not built", server.display());
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{}\"]\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        server.display()
    ));
    z.wait_ready();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (pid1, gen1) = ask(addr).unwrap();
    assert_eq!(gen1, 1);
    z.reload(1);
    let pid2 = ask_gen(addr, 2);
    assert_ne!(pid1, pid2);
    z.stop();
}

/// Run `command` behind zdd (ready after a delay: these servers do not speak sd_notify), check
/// it serves generation 1, reload twice, check each new generation takes over.
fn serves_and_reloads(command: &str) {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = {command}\nready = \"delay\"\nready_delay = \"1s\"\nstart_timeout = \"30s\"\nstop_timeout = \"20s\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    assert_eq!(generation_of(&http_get(port).unwrap()), 1, "{}", z.log_text());
    for gen in 2..=3 {
        z.reload(gen as usize - 1);
        wait_for(&format!("generation {gen}"), DEADLINE, || {
            (generation_of(&http_get(port).expect("request failed")) == gen).then_some(())
        });
    }
    z.stop();
}

#[test]
fn uvicorn_serves_and_reloads() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import uvicorn"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing(
            "uvicorn_serves_and_reloads",
            "python3 -m uvicorn not importable (pip install uvicorn)",
        );
        return;
    }
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    serves_and_reloads(&format!(
        "[\"python3\", \"-m\", \"uvicorn\", \"--fd\", \"3\", \"--app-dir\", \"{fixtures}\", \"asgi_app:app\"]"
    ));
}

#[test]
fn node_http_server_on_fd_3_serves_and_reloads() {
    if std::process::Command::new("node").arg("--version").output().is_err() {
        missing(
            "node_http_server_on_fd_3_serves_and_reloads",
            "node not installed (Debian package nodejs)",
        );
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/node_server.js");
    serves_and_reloads(&format!("[\"node\", \"{script}\"]"));
}

#[test]
fn go_net_http_server_serves_and_reloads() {
    // A Go net/http server that checks LISTEN_PID and LISTEN_FDS itself and takes fd 3 with
    // net.FileListener; standard library only, so building it downloads nothing.
    if std::process::Command::new("go").arg("version").output().is_err() {
        missing(
            "go_net_http_server_serves_and_reloads",
            "go not installed (Debian package golang-go)",
        );
        return;
    }
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/go_server.go");
    // Go's build cache lives under target/ (HOME may be read-only; later runs reuse it).
    let gohome = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("go");
    let out = tempfile::tempdir().unwrap();
    let server = out.path().join("go_server");
    let build = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&server)
        .arg(source)
        .env("GOCACHE", gohome.join("cache"))
        .env("GOPATH", gohome.join("path"))
        .env("GO111MODULE", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap();
    assert!(build.status.success(), "go build {source} failed:\n{}", stderr(&build));
    serves_and_reloads(&format!("[\"{}\"]", server.display()));
}

#[test]
fn systemd_socket_proxyd_accepts_the_sockets() {
    // libsystemd's own sd_listen_fds() checks LISTEN_PID and LISTEN_FDS strictly.
    let proxyd = std::path::Path::new("/lib/systemd/systemd-socket-proxyd");
    if !proxyd.exists() {
        missing(
            "systemd_socket_proxyd_accepts_the_sockets",
            "/lib/systemd/systemd-socket-proxyd missing (Debian package systemd)",
        );
        return;
    }
    // The backend: answers every connection with a fixed line.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in backend.incoming().flatten() {
            let _ = c.write_all(b"backend says hi\n");
        }
    });
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{}\", \"{backend_addr}\"]\nready = \"delay\"\nready_delay = \"300ms\"\n\n\
         [[listen]]\nname = \"proxy\"\ntcp = \"127.0.0.1:{port}\"\n",
        proxyd.display()
    ));
    z.wait_ready();
    let read_line = || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert_eq!(read_line(), "backend says hi\n");
    z.reload(1);
    assert_eq!(read_line(), "backend says hi\n");
    z.stop();
}
