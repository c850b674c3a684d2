"""Real `phi-jax serve` processes for the tests that talk to a server (serve, synthetic data, labelling).

    workdir = trained_workdir(tmp_path_factory)          # a tiny phi trained on the built-in corpus
    with serve_process(workdir, args=("--max_batch_size", "4")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")

The model trains once per test run, whichever tests and xdist workers ask for it (a lock in pytest's
shared temporary root). A server is a `python -m phi_jax.cli serve` subprocess on a free 127.0.0.1 port
with one CPU device; it is ready when /health answers 200, and stopped (SIGTERM, then SIGKILL) when the
block ends. Its log is in `server.log_path`, printed if it fails to start.
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

import filelock

TRAIN = ["--gin_file=tiny_cpu", "--gin.TRAIN_STEPS=60", "--gin.WARMUP_STEPS=5", "--gin.LOG_EVERY=60",
         "--gin.EVAL_EVERY=0", "--gin.CHECKPOINT_EVERY=60", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64",
         "--gin_bindings=tiny.num_layers=1"]


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def trained_workdir(tmp_path_factory) -> pathlib.Path:
    """A training workdir of a 1-layer tiny phi (4096-id BPE of the built-in corpus), 60 steps."""
    root = tmp_path_factory.getbasetemp().parent  # shared by the xdist workers of this run
    workdir = root / "tiny_trained_workdir"
    with filelock.FileLock(str(root / "tiny_trained_workdir.lock")):
        if not (workdir / "done").exists():
            command = [sys.executable, "-m", "phi_jax.cli", "train", f"--workdir={workdir}", *TRAIN]
            result = subprocess.run(command, capture_output=True, text=True, env=_env(),
                                    cwd=pathlib.Path(__file__).parent.parent)
            if result.returncode:
                raise RuntimeError(f"training the tiny model failed:\n{result.stderr[-3000:]}")
            (workdir / "done").write_text("")
    return workdir


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
def serve_process(checkpoint, tokenizer=None, args=(), port: int | None = None, devices: int = 1,
                  log_dir=None, timeout: float = 120):
    port = port or free_port()
    log_dir = pathlib.Path(log_dir) if log_dir else pathlib.Path(checkpoint).parent
    log_path = log_dir / f"serve-{port}-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "phi_jax.cli", "serve", str(checkpoint), "--port", str(port), *map(str, args)]
    if tokenizer is not None:
        command += ["--tokenizer", str(tokenizer)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(devices))
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
