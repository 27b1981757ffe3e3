"""A webhook receiver for the tests: a real HTTP server (stdlib) in its own process on loopback, stopped by PID.

The path of each POST says how to answer it: `/<plan>/<anything>`, where <plan> is a comma list with one entry
per request to that exact path (the last entry repeats):
- a status code, e.g. `500`, `204`, `404`;
- `302`: a redirect to `/redirected` on this receiver (a sender that follows it shows up there);
- `429+2`: the status 429 with `Retry-After: 2`;
- `sleep3`: sleep 3 s before answering 204 (past a sender's timeout).
So `/500,500,204/t1` fails twice, then succeeds. Every request is recorded (method, path, headers, raw body, arrival
time) as one JSON line before it is answered; `WebhookReceiver.requests()` reads them back.

Run as a script: `python webhook_receiver.py RECORD_FILE PORT_FILE` binds a free port on 127.0.0.1 and writes it to
PORT_FILE once listening.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class WebhookReceiver:
    """Starts the receiver process; `url(path)` is on http://localhost:<port> (webhooks refuse IP literals)."""

    def __init__(self, workdir: Path) -> None:
        self.record_path = workdir / "requests.jsonl"
        self._port_path = workdir / "port"
        self._process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.origin}{path}"

    def start(self, timeout_s: float = 30) -> WebhookReceiver:
        command = [sys.executable, __file__, str(self.record_path), str(self._port_path)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self._port_path.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.02)
        self.port = int(self._port_path.read_text())
        return self

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=10)

    def requests(self, path: str) -> list[dict]:
        """The requests received on `path`, in arrival order; `body` is the raw bytes."""
        if not self.record_path.exists():
            return []
        lines = self.record_path.read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [{**r, "body": base64.b64decode(r["body"])} for r in records if r["path"] == path]


class _Handler(BaseHTTPRequestHandler):
    counts: Counter = Counter()
    lock = threading.Lock()
    record_file = None

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.lock:
            index = self.counts[self.path]
            self.counts[self.path] += 1
            record = {
                "method": "POST",
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": base64.b64encode(body).decode(),
                "at": time.time(),
            }
            self.record_file.write(json.dumps(record) + "\n")
            self.record_file.flush()
        plan = self.path.split("/")[1].split(",")
        self._answer(plan[min(index, len(plan) - 1)])

    def _answer(self, entry: str) -> None:
        headers = {}
        if entry.startswith("sleep"):
            time.sleep(float(entry.removeprefix("sleep")))
            status = 204
        elif "+" in entry:
            code, retry_after = entry.split("+")
            status, headers["Retry-After"] = int(code), retry_after
        else:
            status = int(entry)
        if status == 302:
            headers["Location"] = "/redirected"
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the sender gave up waiting

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's signature)
        pass


def main(record_path: str, port_path: str) -> None:
    _Handler.record_file = open(record_path, "a")  # noqa: SIM115 (open for the life of the process)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    partial = f"{port_path}.tmp"
    Path(partial).write_text(str(server.server_address[1]))
    os.replace(partial, port_path)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
