"""How long checkpointing holds up training: the loop's blocked time per async save, the time until
the save is committed, and the time to restore, for the tiny config and a phi-1.5-width state.

The state is a real TrainState (float32 params + AdamW moments) sharded over 8 fake CPU devices with
FSDP, saved and restored through the trainer's own TrainCheckpoints (Orbax, async). "Blocked" is
what the training loop waits for in `save()` (Orbax copies device arrays to host memory before
returning); the write to disk then runs in the background while training continues.

    python bench/checkpoint.py                      # tiny and phi-1.5 width, 4 layers
    python bench/checkpoint.py --phi15_layers 24    # the whole phi-1.5 state: 17 GB of host memory

The full 24-layer phi-1.5 state (1.42B params x 12 bytes = 17 GB) does not fit beside the rest of a
24 GB development machine, so the default keeps phi-1.5's width (vocab 51200, hidden 2048, MLP 8192)
with 4 of its 24 layers; every time here scales with the bytes saved.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax.checkpoint import TrainCheckpoints  # noqa: E402
from phi_jax.config import phi_1_5, tiny  # noqa: E402
from phi_jax.optimizer import OptimizerConfig  # noqa: E402
from phi_jax.sharding import make_mesh, mesh_context  # noqa: E402
from phi_jax.train_step import abstract_state, init_state  # noqa: E402

OPTIMIZER = OptimizerConfig()


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def measure(name, config, saves: int):
    mesh = make_mesh({"fsdp": 8})
    with mesh_context(mesh), tempfile.TemporaryDirectory() as workdir:
        state = init_state(config, OPTIMIZER, mesh, seed=0)
        jax.block_until_ready(state)
        checkpoints = TrainCheckpoints(workdir, max_to_keep=2)
        blocked, committed = [], []
        for step in range(1, saves + 1):
            start = time.perf_counter()
            checkpoints.save(step, state, None, {"model_config": json.loads(config.to_json())})
            blocked.append(time.perf_counter() - start)
            checkpoints.wait()
            committed.append(time.perf_counter() - start)
        restore_start = time.perf_counter()
        restored_step, restored = checkpoints.restore_latest(abstract_state(config, OPTIMIZER, mesh), None, config)
        jax.block_until_ready(restored)
        restore_seconds = time.perf_counter() - restore_start
        checkpoints.close()
    assert restored_step == saves
    size = state_bytes(state)
    return {"name": name, "gb": size / 1e9, "blocked": statistics.median(blocked),
            "committed": statistics.median(committed), "restore": restore_seconds,
            "write_gb_s": size / 1e9 / statistics.median(committed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi15_layers", type=int, default=4, help="0: the tiny state only")
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    configs = {"tiny": tiny(vocab_size=4096)}
    if args.phi15_layers:
        configs[f"phi-1.5 width, {args.phi15_layers} layers"] = phi_1_5(num_layers=args.phi15_layers)
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, mesh fsdp=8, "
          f"median of {args.saves} saves")
    print("| state | size (params + Adam) | loop blocked per save | until committed | write GB/s | restore |")
    print("|---|---|---|---|---|---|")
    for name, config in configs.items():
        row = measure(name, config, args.saves)
        print(f"| {name} | {row['gb']:.2f} GB | {row['blocked']:.3f} s | {row['committed']:.2f} s | "
              f"{row['write_gb_s']:.2f} | {row['restore']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
