"""Storage that fails, for tests: a fault-injecting HTTP proxy on loopback in front of moto's S3
server (S3 that answers errors and stalls), and a small local disk that fills up.

Each rule matches requests by method, path and headers and answers, for its first `times` matches
(None: every match), an HTTP error as S3 sends it (500 InternalError, 503 SlowDown), a reset
connection, a stall (the request is read, then nothing is sent for `seconds`, then the connection
closes) or a trickle (the real answer, sent `TRICKLE_BYTES` at a time every `seconds`: slow but
alive); everything else is forwarded unchanged. Rules may also match by request number (`after`:
only once `after` requests have gone through the proxy), so one run can meet faults at chosen
points. `proxy.injected` counts the faults answered. Point AWS_ENDPOINT_URL at `proxy.endpoint`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
          503: ("SlowDown", "Please reduce your request rate.")}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}
TRICKLE_BYTES = 4096


@dataclass
class Rule:
    method: str
    path: str  # a regex searched in the request path (bucket/key, path-style)
    answer: int | str  # 500, 503, "reset", "stall" or "trickle"
    times: int | None = 1
    header: str | None = None  # only requests carrying this header (e.g. x-amz-copy-source: a server-side copy)
    seconds: float = 0.0  # a stall's length; a trickle's pause between pieces
    after: int = 0  # only from the proxy's request number `after` + 1 on
    served: int = 0

    def matches(self, method: str, path: str, headers, number: int) -> bool:
        return (method == self.method and re.search(self.path, path) is not None
                and (self.header is None or self.header in headers) and number > self.after
                and (self.times is None or self.served < self.times))


class FaultProxy:
    def __init__(self, upstream: str):
        target = urlparse(upstream)
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        self.requests = 0  # answered or forwarded, since start
        self.injected = {"transient": 0, "lasting": 0}  # faults answered since start, by their rule's kind
        self.released = threading.Event()  # set on exit: stalls end at once
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    rule = next((r for r in proxy.rules
                                 if r.matches(self.command, self.path, self.headers, proxy.requests)), None)
                    if rule:
                        rule.served += 1
                        proxy.injected["lasting" if rule.times is None else "transient"] += 1
                if rule and rule.answer == "stall":
                    proxy.released.wait(rule.seconds)
                    self.close_connection = True
                    return
                if rule and rule.answer == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                if rule and rule.answer != "trickle":
                    code, message = ERRORS[rule.answer]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(rule.answer)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"expect"}}
                    if "chunked" in self.headers.get("Transfer-Encoding", ""):  # as it came (aws-chunked inside)
                        headers["Transfer-Encoding"] = "chunked"
                        upstream_conn.request(self.command, self.path, body=iter([body]), headers=headers,
                                              encode_chunked=True)
                    else:
                        headers["Content-Length"] = str(len(body))
                        upstream_conn.request(self.command, self.path, body=body, headers=headers)
                    response = upstream_conn.getresponse()
                    data = response.read()
                finally:
                    upstream_conn.close()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                # A HEAD's Content-Length is the object's size, not this (empty) body's.
                self.send_header("Content-Length", response.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if rule:  # the trickle
                    for start in range(0, len(data), TRICKLE_BYTES):
                        self.wfile.write(data[start:start + TRICKLE_BYTES])
                        self.wfile.flush()
                        if proxy.released.wait(rule.seconds):
                            break
                else:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, *rules: Rule) -> None:
        with self.lock:
            self.rules.extend(rules)

    def remove(self, *rules: Rule) -> None:
        with self.lock:
            for rule in rules:
                self.rules.remove(rule)

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def small_disk(mount: Path, size: str):
    """A tmpfs of `size` (mount's -o size=: "16m") mounted at `mount` for the block, then unmounted.
    Mounting needs root: the test is skipped elsewhere, saying so."""
    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full disk is tried on a small tmpfs, and mounting one needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a full disk is tried on a small tmpfs, which could not be mounted: {done.stderr.strip()}")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: str, leave: int) -> str:
    """A file that takes all but `leave` bytes of the disk's free space; delete it to free them."""
    filler = os.path.join(disk, "filler")
    stat = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler
