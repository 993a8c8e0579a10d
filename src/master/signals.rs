//! The signals the master reacts to. Handlers only set a flag and wake the loop through a
//! self-pipe (signal-hook); the loop acts on them in a fixed order.

use super::*;

/// Signals the master reacts to. Handlers only set a flag and wake the loop through a pipe.
pub(super) struct Signals {
    pub(super) wake_r: UnixStream,
    _wake_w: UnixStream,
    flags: Vec<(Signal, Arc<AtomicBool>)>,
}

/// Also what an upgrade blocks across its exec (handover.rs).
pub(super) const HANDLED: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
    Signal::SIGQUIT,
];

impl Signals {
    pub(super) fn install() -> std::io::Result<Signals> {
        let (wake_r, wake_w) = UnixStream::pair()?;
        wake_r.set_nonblocking(true)?;
        wake_w.set_nonblocking(true)?;
        let mut flags = Vec::new();
        for sig in HANDLED {
            let flag = Arc::new(AtomicBool::new(false));
            // Flag first, then the wake-up: when the loop wakes, the flag is already set.
            signal_hook::flag::register(sig as i32, Arc::clone(&flag))?;
            signal_hook::low_level::pipe::register_raw(sig as i32, wake_w.as_raw_fd())?;
            flags.push((sig, flag));
        }
        Ok(Signals {
            wake_r,
            _wake_w: wake_w,
            flags,
        })
    }

    /// Drain the wake-up pipe and return the signals that arrived, in a fixed order.
    pub(super) fn take(&self) -> Vec<Signal> {
        let mut buf = [0u8; 256];
        while nix::unistd::read(self.wake_r.as_raw_fd(), &mut buf).is_ok_and(|n| n > 0) {}
        self.flags
            .iter()
            .filter(|(_, f)| f.swap(false, Ordering::SeqCst))
            .map(|(s, _)| *s)
            .collect()
    }
}
