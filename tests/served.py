"""A real `bentoml serve` of the two services in a subprocess, on a free port, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedBento:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            **os.environ,
            "SAM3_WEIGHTS_PATH": "demo",
            "SAM3_DEVICE": "cpu",
            "BENTOML_DO_NOT_TRACK": "True",
            "JOB_STORE_PATH": str(log_path.parent / f"jobs-{self.port}.sqlite3"),  # never shared between servers
            **env,
        }
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> ServedBento:
        command = [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service:Gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            command, cwd=ROOT, env=self._env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self._process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"bentoml serve not ready in {timeout_s}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._process:
            self._log.close()

    def kill(self) -> None:
        """kill -9 of the whole server, with no warning: the arbiter and every gateway and model worker (circus
        starts each worker in its own session, so the arbiter's process group alone would leave them running)."""
        for group in [self._process.pid, *self._children()]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self._process.wait(timeout=10)

    def workers(self, service: str) -> int:
        """How many worker processes of `service` (sam3-gateway, sam3-model) the server runs."""
        return len(self.worker_pids(service))

    def worker_pids(self, service: str) -> list[int]:
        return [pid for pid, args in self._children().items() if f"--service-name {service} " in f"{args} "]

    def _children(self) -> dict[int, str]:
        command = ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self._process.pid)]
        listing = subprocess.run(command, capture_output=True, text=True).stdout
        return {int(line.split()[0]): line for line in listing.splitlines()}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
