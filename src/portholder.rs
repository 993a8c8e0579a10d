//! Who holds a TCP port, for a bind that fails with EADDRINUSE: "held by pid 4242 (python3 -m
//! http.server 8080)" instead of a bare errno, so the operator knows what to stop.
//!
//! Found the way `ss -ltnp` finds it: the inodes of the listening sockets on that port from
//! /proc/net/tcp and /proc/net/tcp6 (state 0A), then every /proc/<pid>/fd/* that links to
//! `socket:[inode]`. Root sees every process; another user sees only its own, and the message
//! says so. This runs only on the error path.

use std::collections::BTreeSet;
use std::net::SocketAddr;

/// At most this many holders are named.
const MAX_NAMED: usize = 5;
/// A command line is cut to this many characters.
const MAX_CMDLINE: usize = 80;

/// Whether a socket listens on `addr`'s port now (any address: what /proc/net shows).
pub fn in_use(addr: &SocketAddr) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .any(|table| std::fs::read_to_string(table).is_ok_and(|text| !listening_inodes(&text, addr.port()).is_empty()))
}

/// A sentence that says who holds `addr`'s port, as well as can be seen from here.
pub fn describe(addr: &SocketAddr) -> String {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, addr.port()));
        }
    }
    if inodes.is_empty() {
        return format!(
            "no listening socket on port {} is visible here: a socket bound without listening, or \
             one in another network namespace, holds it",
            addr.port()
        );
    }
    let holders = processes_holding(&inodes);
    if holders.is_empty() {
        let who = if nix::unistd::geteuid().is_root() {
            "a process not visible in this pid namespace".to_string()
        } else {
            format!(
                "a process that uid {} cannot see (run as root to name it)",
                nix::unistd::geteuid()
            )
        };
        let inodes: Vec<String> = inodes.iter().map(|i| i.to_string()).collect();
        return format!("held by {who}: listening socket inode {}", inodes.join(", "));
    }
    let mut named: Vec<String> = holders
        .iter()
        .take(MAX_NAMED)
        .map(|&pid| format!("pid {pid} ({})", command_of(pid)))
        .collect();
    if holders.len() > MAX_NAMED {
        named.push(format!("and {} more", holders.len() - MAX_NAMED));
    }
    format!("held by {}", named.join(", "))
}

/// Inodes of the sockets in a /proc/net/tcp{,6} table that listen on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let state = f.get(3)?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            let (_, p) = local.rsplit_once(':')?;
            (*state == "0A" && u16::from_str_radix(p, 16).ok()? == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// Pids with an fd on one of `inodes`, ascending.
fn processes_holding(inodes: &BTreeSet<u64>) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path()).ok().is_some_and(|target| {
                        socket_inode(target.as_os_str().to_str().unwrap_or("")).is_some_and(|i| inodes.contains(&i))
                    })
                })
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The command line of `pid`, shortened, or its `comm`.
fn command_of(pid: i32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text: String = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let text = if text.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_else(|_| "?".into())
    } else {
        text
    };
    if text.chars().count() > MAX_CMDLINE {
        let cut: String = text.chars().take(MAX_CMDLINE).collect();
        format!("{cut}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1\n\
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n";

    #[test]
    fn finds_listening_sockets_by_port() {
        assert_eq!(listening_inodes(TABLE, 8080), vec![4242]);
        assert_eq!(listening_inodes(TABLE, 80), vec![77]);
        assert!(listening_inodes(TABLE, 443).is_empty());
    }

    #[test]
    fn reads_socket_links() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
    }

    #[test]
    fn names_this_process_as_the_holder() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let text = describe(&addr);
        assert!(text.contains(&format!("pid {} (", std::process::id())), "{text}");
    }
}
