"""The GPU suite's first step: what the machine is (for the record beside every number).

Prints the host, nvidia-smi, and the versions of Python, jax/jaxlib (and its devices), flax,
optax, orbax-checkpoint, safetensors, numpy, triton, transformers and torch (and what torch sees).
A missing package is printed, not fatal. JAX is asked not to preallocate, so this takes no memory.
"""

import os
import platform
import shutil
import subprocess

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def run(cmd):
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        print((result.stdout + result.stderr).rstrip() or f"{cmd[0]}: no output (exit {result.returncode})")
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"{cmd[0]}: {type(e).__name__}: {e}")


def main():
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    shm = shutil.disk_usage("/dev/shm").free / 2**30 if os.path.isdir("/dev/shm") else 0.0
    print(f"host {platform.node()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, /dev/shm {shm:.0f} GiB free; "
          f"Python {platform.python_version()}", flush=True)
    run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,clocks.max.sm,driver_version", "--format=csv"])
    run(["nvidia-smi"])
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "safetensors", "numpy", "triton",
                 "transformers", "torch"):
        try:
            module = __import__(name, fromlist=["_"])
            print(f"{name} {getattr(module, '__version__', '?')}", flush=True)
        except Exception as e:  # noqa: BLE001 - record it and go on
            print(f"{name} unavailable: {type(e).__name__}: {e}", flush=True)
    try:
        import jax
        print(f"jax backend {jax.default_backend()}, devices {jax.devices()}, kind {jax.devices()[0].device_kind}")
    except Exception as e:  # noqa: BLE001
        print(f"jax devices: {type(e).__name__}: {e}")
    try:
        import torch
        cuda = torch.cuda.is_available()
        print(f"torch cuda {torch.version.cuda}, available {cuda}"
              + (f", {torch.cuda.get_device_name()}" if cuda else ""))
    except Exception as e:  # noqa: BLE001
        print(f"torch cuda: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
