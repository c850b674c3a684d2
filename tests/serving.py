"""Real `phi-jax serve` processes for the tests that talk to a server (serve, synthetic data, labelling).

    workdir = trained_workdir(tmp_path_factory)          # a tiny phi trained on the built-in corpus
    with serve_process(workdir, args=("--max_batch_size", "4")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")

The model trains once per test run, whichever tests and xdist workers ask for it (a lock in pytest's
shared temporary root). A server is phi_jax.serving.process's subprocess with `devices` CPU devices
(one unless asked); see there for the rest.
"""

import os
import pathlib
import subprocess
import sys

import filelock

from phi_jax.serving import process
from phi_jax.serving.process import ServerProcess, free_port, request, stop

__all__ = ["ServerProcess", "free_port", "request", "serve_process", "stop", "trained_workdir"]

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


def serve_process(checkpoint, tokenizer=None, args=(), port: int | None = None, devices: int = 1, log_dir=None,
                  timeout: float = 120, lazy_compile: bool = True):
    """`lazy_compile`: start without compiling every shape first (about 13 s of a 2-core machine per server);
    tests/test_serve.py's module server starts the default way."""
    args = (*args, "--lazy_compile") if lazy_compile else tuple(args)
    return process.serve_process(checkpoint, tokenizer, args, port, _env(devices), log_dir, timeout)
