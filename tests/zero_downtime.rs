//! Zero downtime as a correctness test: a client opening a new connection per request runs
//! while the master reloads 20 times. Not one connection may fail, and the answering worker
//! must change.

mod common;

use std::collections::BTreeSet;

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
    let load = Load::start(addr, 2);
    for i in 1..=20 {
        z.reload(i);
    }
    let LoadResult { requests, seen, .. } = load.finish();
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
