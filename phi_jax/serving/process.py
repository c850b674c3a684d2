"""A `phi-jax serve` subprocess, started and stopped from Python: for tests, benchmarks and notebooks.

    with serve_process("demo_out/run", args=("--max_batch_size", "16")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        status, metrics = server.get("/metrics")

The server takes a free 127.0.0.1 port unless `port` is given, and is ready when /health answers 200;
when the block ends it gets SIGTERM (then SIGKILL after `timeout`). Its output goes to `log_path`,
shown in the error if it fails to start.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerProcess:
    port: int
    process: subprocess.Popen
    log_path: pathlib.Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def get(self, path: str, headers=None):
        """(status, parsed JSON body) of a GET."""
        return request(self.url + path, headers=headers)

    def post(self, path: str, body, headers=None):
        return request(self.url + path, body, headers)

    def metrics(self) -> dict:
        return self.get("/metrics")[1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def request(url: str, body=None, headers=None, timeout: float = 60):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@contextlib.contextmanager
def serve_process(checkpoint, tokenizer=None, args=(), port: int | None = None, env: dict | None = None,
                  log_dir=None, timeout: float = 120):
    port = port or free_port()
    log_dir = pathlib.Path(log_dir) if log_dir else pathlib.Path(checkpoint).parent
    log_path = log_dir / f"serve-{port}-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "phi_jax.cli", "serve", str(checkpoint), "--port", str(port), *map(str, args)]
    if tokenizer is not None:
        command += ["--tokenizer", str(tokenizer)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ))
    server = ServerProcess(port, process, log_path)
    try:
        _wait_until_ready(server, timeout)
        yield server
    finally:
        stop(server)


def _wait_until_ready(server: ServerProcess, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"phi-jax serve exited with status {server.process.returncode}:\n{server.log()}")
        try:
            if server.get("/health")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"phi-jax serve was not ready after {timeout} s:\n{server.log()}")


def stop(server: ServerProcess, timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit status."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode
