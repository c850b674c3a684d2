"""Multi-process start-up: `jax.distributed.initialize` when the environment calls for it.

    explicit     --coordinator_address/--num_processes/--process_id (or PHI_JAX_COORDINATOR,
                 PHI_JAX_NUM_PROCESSES, PHI_JAX_PROCESS_ID, as launch/local.sh sets them)
    SLURM        more than one task in SLURM_NTASKS: jax reads the coordinator from SLURM's variables
    TPU pod      more than one worker in TPU_WORKER_HOSTNAMES: jax asks the TPU metadata
    otherwise    one process; nothing to do
"""

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Returns whether jax.distributed was initialized. Call before anything touches a device."""
    coordinator_address = coordinator_address or os.environ.get("PHI_JAX_COORDINATOR")
    if coordinator_address:
        num_processes = num_processes or int(os.environ["PHI_JAX_NUM_PROCESSES"])
        process_id = process_id if process_id is not None else int(os.environ["PHI_JAX_PROCESS_ID"])
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU processes exchange collectives over gloo (tests and launch/local.sh).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or len(
            [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    return False
