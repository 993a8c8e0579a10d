#!/usr/bin/env python3
"""The example app that zdd runs in the README: a tiny HTTP server that takes its listening
socket from zdd (fd 3, LISTEN_FDS), says READY=1 on NOTIFY_SOCKET, and exits gracefully on
SIGTERM. Every answer names the process and the zdd generation that served it."""

import http.server
import os
import signal
import socket
import socketserver
import sys
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from pid {os.getpid()}, generation {os.environ.get('ZDD_GENERATION', '?')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        # stdout goes to zdd's log, tagged with this worker's pid and generation.
        print(fmt % args, flush=True)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def server_bind(self):
        pass  # the socket arrives bound and listening

    def server_activate(self):
        pass


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("example_app: run me under zdd (no LISTEN_FDS for this process)")
    server = Server(("", 0), Handler, bind_and_activate=False)
    server.socket = socket.socket(fileno=3)
    server.server_address = server.socket.getsockname()

    # SIGTERM: stop accepting, finish the requests in flight, exit.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())

    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", "\0" + notify[1:] if notify.startswith("@") else notify)
    print(f"serving on {server.server_address}", flush=True)
    server.serve_forever()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
