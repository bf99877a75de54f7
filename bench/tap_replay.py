#!/usr/bin/env python3
"""A TAP source at memory speed: answers every TAP_CONNECT with a pre-encoded dump, then closes.

    python bench/tap_replay.py DUMPFILE PORTFILE

Listens on 127.0.0.1 (a free port, written to PORTFILE once listening). For each
connection it reads the TAP_CONNECT frame, sends DUMPFILE with sendfile (no copy through
user space: the replay costs next to no CPU, so the bench measures Astaire's own TAP
path), and closes, as the Clearwater fork ends a dump. Runs until killed.
"""
import os
import socket
import sys
import threading


def _serve(conn: socket.socket, path: str) -> None:
    with conn:
        head = b""
        while len(head) < 24:
            more = conn.recv(24 - len(head))
            if not more:
                return
            head += more
        body = int.from_bytes(head[8:12], "big")
        while body:
            more = conn.recv(min(body, 65536))
            if not more:
                return
            body -= len(more)
        with open(path, "rb") as f:
            conn.sendfile(f)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):  # the client reads to the end and closes
            pass


def main() -> None:
    dump, portfile = sys.argv[1], sys.argv[2]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.rename(tmp, portfile)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn, dump), daemon=True).start()


if __name__ == "__main__":
    main()
