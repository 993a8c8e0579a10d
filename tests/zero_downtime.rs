//! Zero downtime as a correctness test: a client opening a new connection per request runs
//! while the master reloads 20 times. Not one connection may fail, and the answering worker
//! must change.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;

#[test]
fn twenty_reloads_under_load_lose_no_connection() {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\ncount = 2\nstop_timeout = \"10s\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failures, seen) = (Arc::clone(&stop), Arc::clone(&failures), Arc::clone(&seen));
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut n = 0u64;
                // Bounded in time as well as by the stop flag.
                while !stop.load(Ordering::SeqCst) && start.elapsed() < DEADLINE * 4 {
                    match ask(addr) {
                        Ok((pid, gen)) => {
                            seen.lock().unwrap().insert((gen, pid));
                        }
                        Err(e) => failures.lock().unwrap().push(format!("{:?}: {e}", start.elapsed())),
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    for i in 1..=20 {
        z.reload(i);
    }
    stop.store(true, Ordering::SeqCst);
    let requests: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {requests} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let seen = seen.lock().unwrap();
    let generations: BTreeSet<u64> = seen.iter().map(|(g, _)| *g).collect();
    assert!(
        generations.len() >= 10,
        "answers came from only {generations:?} over {requests} requests"
    );
    assert!(seen.iter().map(|(_, p)| p).collect::<BTreeSet<_>>().len() >= 20);
    eprintln!(
        "{requests} requests, 0 failed, {} generations answered",
        generations.len()
    );
    z.stop();
}
