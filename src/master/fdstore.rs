//! systemd's fd store: the listening sockets outlive a crash of the master.
//!
//! Theory of operation. Under systemd (`NOTIFY_SOCKET` set for the master), the master sends
//! each listening socket to systemd with `FDSTORE=1` and `FDNAME=<listener name>` (one datagram
//! per listener, the socket attached as SCM_RIGHTS). systemd keeps a copy of the socket for as
//! long as the unit is neither stopped nor failed (`FileDescriptorStoreMax=` must allow it). If
//! the master is killed, its workers get SIGTERM and exit, but the sockets stay open in systemd:
//! connections that arrive meanwhile wait in the kernel's accept queue instead of being refused.
//! When systemd restarts the master (`Restart=on-failure`) it passes the stored sockets back as
//! `LISTEN_FDS` with their names in `LISTEN_FDNAMES`, and the master adopts them (start.rs);
//! the new workers accept what waited.
//!
//! What the store should hold is what the next master would adopt: the listeners of the
//! serving config and, during a reload, those of the config being tried (the file on disk is
//! already that config). [`FdStore`] keeps what it believes systemd holds, as (name, address)
//! pairs; [`FdStore::sync`] compares it with what should be there and queues the messages that
//! make it so ([`plan`], pure). systemd removes by name only (`FDSTOREREMOVE=1` closes every fd
//! of that name), so a name with anything to drop is removed whole and its sockets that stay
//! are stored again; removes go before stores. systemd ignores an fd it already holds (the same
//! open socket), so re-sending one is harmless: a master resumed after an upgrade starts with no
//! belief and sends every listener again.
//!
//! The messages go out from the loop ([`FdStore::flush`]), never blocking: if systemd's queue
//! is full (EAGAIN) the rest waits for a retry deadline.

use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use slog::{info, warn, Logger};

use crate::config::ListenAddr;
use crate::listen::Listener;
use crate::worker::notify::{fdstore_message, fdstore_remove_message, valid_fdname, SystemdNotifier};

/// How long to wait before trying again when systemd's notify queue is full.
const RETRY: Duration = Duration::from_millis(10);

/// A message for systemd's fd store.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step<T> {
    /// `FDSTOREREMOVE=1`: close every fd stored under this name.
    Remove(String),
    /// `FDSTORE=1`: store this socket under this name.
    Store(String, T),
}

/// What to send so that systemd holds `desired` when it now holds `stored` (both as (name,
/// address) pairs; `desired` carries what to send along). Removes first, then stores, each in
/// name order; a name whose stored set is not kept whole is removed and stored anew.
pub(super) fn plan<T: Clone>(stored: &[(String, ListenAddr)], desired: &[(String, ListenAddr, T)]) -> Vec<Step<T>> {
    let names: BTreeSet<&str> = stored
        .iter()
        .map(|(n, _)| n.as_str())
        .chain(desired.iter().map(|(n, _, _)| n.as_str()))
        .collect();
    let mut removes = Vec::new();
    let mut stores = Vec::new();
    for name in names {
        let has = |a: &ListenAddr| stored.iter().any(|(n, s)| n == name && s == a);
        let wanted: Vec<&(String, ListenAddr, T)> = desired.iter().filter(|(n, _, _)| n == name).collect();
        let keeps_all = stored
            .iter()
            .filter(|(n, _)| n == name)
            .all(|(_, a)| wanted.iter().any(|(_, w, _)| w == a));
        let mut seen: Vec<&ListenAddr> = Vec::new();
        if !keeps_all {
            removes.push(Step::Remove(name.to_string()));
        }
        for (n, a, t) in wanted {
            if seen.contains(&a) || (keeps_all && has(a)) {
                continue;
            }
            seen.push(a);
            stores.push(Step::Store(n.clone(), t.clone()));
        }
    }
    removes.extend(stores);
    removes
}

impl super::Master {
    /// Make systemd's fd store hold the listeners of the serving config and of the one a
    /// reload is trying, and send what that takes now.
    pub(super) fn sync_fdstore(&mut self) {
        let serving = self.config.listen.iter().zip(&self.listeners);
        let pending = self
            .pending
            .iter()
            .flat_map(|p| p.config.listen.iter().zip(&p.listeners));
        let desired = serving
            .chain(pending)
            .map(|(lc, l)| (lc.name.clone(), Rc::clone(l)))
            .collect();
        self.fdstore.sync(&self.log, desired);
        self.fdstore.flush(&self.log, self.systemd.as_ref(), Instant::now());
    }
}

/// The master's side of the fd store; inert when the master does not run under systemd.
pub(super) struct FdStore {
    enabled: bool,
    /// What systemd holds under which name, as far as this master knows (once `queue` is out).
    stored: Vec<(String, ListenAddr)>,
    queue: VecDeque<Step<Rc<Listener>>>,
    /// systemd's queue was full: try again then.
    retry_at: Option<Instant>,
    /// The unit's FileDescriptorStoreMax= if known, and whether a shortfall was logged.
    max: Option<usize>,
    warned_max: bool,
    /// Failed sends are logged once, then counted.
    failed: u64,
}

impl FdStore {
    /// Enabled when the master runs under systemd; believes systemd holds nothing yet.
    pub(super) fn new(enabled: bool) -> FdStore {
        FdStore {
            enabled,
            stored: Vec::new(),
            queue: VecDeque::new(),
            retry_at: None,
            max: crate::worker::notify::fdstore_max_from_env(),
            warned_max: false,
            failed: 0,
        }
    }

    /// What systemd passed back at start (name, address): what it holds for us now.
    pub(super) fn set_stored(&mut self, stored: Vec<(String, ListenAddr)>) {
        self.stored = stored;
    }

    /// Queue what makes systemd hold exactly `desired` (name, listener).
    pub(super) fn sync(&mut self, log: &Logger, desired: Vec<(String, Rc<Listener>)>) {
        if !self.enabled {
            return;
        }
        let desired: Vec<(String, ListenAddr, Rc<Listener>)> = desired
            .into_iter()
            .filter(|(name, _)| {
                let ok = valid_fdname(name);
                if !ok {
                    warn!(log, "listener name is not a valid systemd FDNAME; not kept in systemd's fd store"; "name" => name);
                }
                ok
            })
            .map(|(name, l)| (name, l.addr().clone(), l))
            .collect();
        let steps = plan(&self.stored, &desired);
        if steps.is_empty() {
            return;
        }
        self.stored.clear();
        for (n, a, _) in &desired {
            if !self.stored.iter().any(|(sn, sa)| sn == n && sa == a) {
                self.stored.push((n.clone(), a.clone()));
            }
        }
        if let Some(max) = self.max {
            if self.stored.len() > max && !self.warned_max {
                self.warned_max = true;
                warn!(log, "more listeners than FileDescriptorStoreMax=; systemd keeps only the first, the others do not survive a crash of the master";
                    "listeners" => self.stored.len(), "max" => max);
            }
        }
        let names = |remove: bool| {
            steps
                .iter()
                .filter_map(|s| match s {
                    Step::Remove(n) if remove => Some(n.as_str()),
                    Step::Store(n, _) if !remove => Some(n.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        info!(log, "systemd fd store"; "store" => names(false), "remove" => names(true));
        self.queue.extend(steps);
    }

    /// Send what is queued, until systemd's queue is full (then retry at [`Self::deadline`]).
    pub(super) fn flush(&mut self, log: &Logger, systemd: Option<&SystemdNotifier>, now: Instant) {
        if self.queue.is_empty() || self.retry_at.is_some_and(|t| t > now) {
            return;
        }
        self.retry_at = None;
        let Some(systemd) = systemd else {
            self.queue.clear();
            return;
        };
        while let Some(step) = self.queue.front() {
            let (r, name) = match step {
                Step::Remove(name) => (systemd.send_with_fds(&fdstore_remove_message(name), &[]), name),
                Step::Store(name, l) => (systemd.send_with_fds(&fdstore_message(name), &[l.raw_fd()]), name),
            };
            match r {
                Ok(()) => {}
                Err(Errno::EAGAIN) => {
                    self.retry_at = Some(now + RETRY);
                    return;
                }
                Err(e) => {
                    self.failed += 1;
                    if self.failed == 1 {
                        warn!(log, "could not tell systemd's fd store; listeners may not survive a crash of the master";
                            "name" => name.as_str(), "error" => crate::errno::describe(e));
                    }
                }
            }
            self.queue.pop_front();
        }
    }

    /// When [`Self::flush`] wants to run again, if it is waiting for systemd.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.retry_at.filter(|_| !self.queue.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(port: u16) -> ListenAddr {
        ListenAddr::Tcp(([127, 0, 0, 1], port).into())
    }

    fn s(name: &str, port: u16) -> (String, ListenAddr) {
        (name.into(), tcp(port))
    }

    fn d(name: &str, port: u16) -> (String, ListenAddr, u16) {
        (name.into(), tcp(port), port)
    }

    fn store(name: &str, port: u16) -> Step<u16> {
        Step::Store(name.into(), port)
    }

    fn remove(name: &str) -> Step<u16> {
        Step::Remove(name.into())
    }

    #[test]
    fn a_first_start_stores_every_listener() {
        assert_eq!(
            plan(&[], &[d("http", 1), d("admin", 2)]),
            vec![store("admin", 2), store("http", 1)]
        );
    }

    #[test]
    fn what_systemd_holds_already_is_not_sent_again() {
        assert_eq!(
            plan(&[s("http", 1), s("admin", 2)], &[d("http", 1), d("admin", 2)]),
            vec![]
        );
        // A reload that adds one stores only that one.
        assert_eq!(
            plan(&[s("http", 1)], &[d("http", 1), d("new", 3)]),
            vec![store("new", 3)]
        );
    }

    #[test]
    fn a_listener_the_config_dropped_is_removed() {
        assert_eq!(plan(&[s("http", 1), s("old", 2)], &[d("http", 1)]), vec![remove("old")]);
        assert_eq!(plan(&[s("http", 1)], &[]), vec![remove("http")]);
    }

    #[test]
    fn a_name_moved_to_another_address_is_removed_then_stored() {
        assert_eq!(
            plan(&[s("http", 1)], &[d("http", 2)]),
            vec![remove("http"), store("http", 2)]
        );
    }

    /// During a reload that moves "http" the store holds both (the serving one and the one
    /// being tried); at commit the old one goes, and since systemd removes by name, the new
    /// one is stored again after the remove.
    #[test]
    fn one_name_for_two_addresses_during_a_reload() {
        let during = plan(&[s("http", 1)], &[d("http", 1), d("http", 2)]);
        assert_eq!(during, vec![store("http", 2)]);
        let commit = plan(&[s("http", 1), s("http", 2)], &[d("http", 2)]);
        assert_eq!(commit, vec![remove("http"), store("http", 2)]);
        // A failed reload: the serving one is stored again.
        let discard = plan(&[s("http", 1), s("http", 2)], &[d("http", 1)]);
        assert_eq!(discard, vec![remove("http"), store("http", 1)]);
    }

    /// A renamed listener on the same address: the old name goes first, or systemd would keep
    /// the socket under it (it ignores a second copy of an fd it holds).
    #[test]
    fn a_renamed_listener_is_removed_before_it_is_stored_under_its_new_name() {
        assert_eq!(
            plan(&[s("http", 1)], &[d("web", 1)]),
            vec![remove("http"), store("web", 1)]
        );
    }

    #[test]
    fn the_same_pair_twice_is_stored_once() {
        assert_eq!(plan(&[], &[d("http", 1), d("http", 1)]), vec![store("http", 1)]);
    }
}
