//! Fuzz the config loader: `config::parse`, the function behind `zdd check`, `start` and every
//! reload. Arbitrary bytes (lossily decoded as UTF-8: valid UTF-8 is parsed as is) must never
//! panic; an error must place itself (`file:line:column`) inside the text and say what is wrong;
//! an accepted config must hold what validation promises.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;

// zdd has no library target: include the modules themselves.
#[allow(dead_code, unused_imports)]
#[path = "../../src/config/mod.rs"]
mod config;
#[allow(dead_code, unused_imports)]
#[path = "../../src/errno.rs"]
mod errno;

use config::{ConfigError, Ready};

// A directory that does not exist, so relative paths resolve the same on every machine.
const PATH: &str = "/nonexistent-zdd-fuzz/app.toml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match config::parse(Path::new(PATH), &text) {
        Err(ConfigError::Invalid {
            file,
            line,
            col,
            key: _,
            msg,
        }) => {
            assert_eq!(file, PATH);
            assert!(!msg.trim().is_empty(), "error without a message at {line}:{col}");
            assert!(msg.len() <= 1100, "an error message of {} bytes echoes its input", msg.len());
            let lines = text.split('\n').count();
            assert!(
                line >= 1 && line <= lines,
                "error line {line} outside the text ({lines} lines)"
            );
            let width = text.split('\n').nth(line - 1).map_or(0, |l| l.chars().count());
            assert!(
                col >= 1 && col <= width + 1,
                "error column {col} outside line {line} ({width} chars)"
            );
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse() reported a read error: {e}"),
        Ok(c) => {
            assert_eq!(c.source, text);
            let w = &c.worker;
            assert!(!w.command.is_empty() && !w.command[0].is_empty());
            assert!(w.command.iter().all(|a| !a.contains('\0')));
            assert!((1..=4096).contains(&w.count));
            if let Ready::Delay(d) = w.ready {
                assert!(d < w.start_timeout);
            }
            assert!(!w.start_timeout.is_zero() && w.start_timeout <= config::MAX_DURATION);
            assert!(w.stop_timeout <= config::MAX_DURATION);
            assert!(w.command.iter().all(|a| a.len() <= config::MAX_ARG_LEN));
            assert!(c.master.max_draining >= 1);
            assert!(c.master.control_socket.as_os_str().len() <= 107);
            assert!(c.master.notify_socket.as_os_str().len() <= 107);
            assert!(c.rlimits.iter().all(|r| r.soft <= r.hard));
            let mut names = HashSet::new();
            let mut addrs = HashSet::new();
            for l in &c.listen {
                assert!(!l.name.is_empty() && l.name.len() <= 255 && !l.name.contains(':'));
                assert!(names.insert(&l.name), "duplicate listener name accepted");
                assert!(addrs.insert(&l.addr), "duplicate listener address accepted");
                assert!(l.backlog >= 1);
            }
        }
    }
});
