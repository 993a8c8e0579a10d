//! The control socket: how `zdd reload`, `stop`, `status` and `reopen-logs` talk to a running
//! master.
//!
//! Protocol: a unix stream socket (mode 0600, owned by the master's user). The client sends one
//! request, a JSON object on one line: `{"cmd":"reload","if_generation":3}`, `{"cmd":"stop"}`,
//! `{"cmd":"status"}`, `{"cmd":"reopen-logs"}`. The master answers with zero or more progress
//! lines `{"type":"progress","message":"…"}` and exactly one result line
//! `{"type":"result","ok":true|false,"message":"…","data":{…}}`.
//!
//! The master checks SO_PEERCRED when it accepts: only root and its own uid are served. A
//! connection is non-blocking and part of the master's poll loop, so a client can never stall
//! the master: a request must arrive whole within [`REQUEST_TIMEOUT`] and within
//! [`MAX_REQUEST`] bytes; malformed requests get an error result and the connection closes;
//! a client that does not read its replies is dropped once [`MAX_PENDING_OUTPUT`] is queued.

pub mod client;
mod protocol;
pub mod server;

pub use protocol::{Reply, Request, REQUEST_TIMEOUT};
pub use server::{Conn, ControlError, ControlServer, Input, Waiting};
