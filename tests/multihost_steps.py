"""Run by test_multihost.py under launch/local.sh: a few sharded train steps in which each process
feeds only its own rows of the batch. Process 0 prints the losses as one JSON line."""

import json
import sys

from phi_jax import distributed

distributed.initialize()

import jax  # noqa: E402  (after jax.distributed)

from phi_jax.sharding import global_batch, local_batch_rows, make_mesh, mesh_context  # noqa: E402
from phi_jax.train_step import init_state, jit_train_step  # noqa: E402
from tests.test_train import BATCH, MODEL, OPTIMIZER, make_batches  # noqa: E402

mesh = make_mesh(json.loads(sys.argv[1]))
first, rows = local_batch_rows(mesh, BATCH)
losses = []
with mesh_context(mesh):
    state = init_state(MODEL, OPTIMIZER, mesh, seed=0)
    step = jit_train_step(MODEL, OPTIMIZER, mesh)
    for batch in make_batches(3):
        local = {name: value[first:first + rows] for name, value in batch.items()}
        state, metrics = step(state, global_batch(mesh, local, BATCH))
        losses.append(float(metrics["loss"]))
if jax.process_index() == 0:
    print("LOSSES " + json.dumps({"losses": losses, "processes": jax.process_count(), "rows": rows}))
