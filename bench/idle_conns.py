#!/usr/bin/env python3
"""Holds idle keep-alive client connections open on a proxy, for bench/run.sh.

Usage: idle_conns.py HOST:PORT COUNT SECONDS READY_FILE

Opens COUNT TCP connections to HOST:PORT, sends one HTTP/1.1 GET on each and reads its answer
(so each connection is past protocol detection and has carried a request, as a client's pooled
keep-alive connection has), writes "held COUNT connections" to READY_FILE, then keeps them
open and silent for SECONDS (or until killed) and closes them.
"""

import resource
import socket
import sys
import time


def complete(answer: bytes) -> bool:
    """Whether an HTTP/1.1 answer (content-length or chunked) has arrived whole."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return body.endswith(b"0\r\n\r\n")


def main() -> int:
    addr, count, seconds, ready = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    host, port = addr.rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
    request = f"GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode()
    conns = []
    for i in range(count):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(request)
        answer = b""
        while not complete(answer):
            chunk = s.recv(4096)
            if not chunk:
                print(f"connection {i} closed before its answer: {answer!r}", file=sys.stderr)
                return 1
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            print(f"connection {i}: unexpected answer {answer[:80]!r}", file=sys.stderr)
            return 1
        conns.append(s)
    with open(ready, "w") as f:
        f.write(f"held {len(conns)} connections\n")
    time.sleep(seconds)
    for s in conns:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
