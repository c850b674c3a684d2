"""The training loop: mesh, state, data, the jitted step, metrics, evaluation, checkpoints.

`train(TrainConfig(...), workdir)` is the whole job; gin (phi_jax/experiment.py) only builds the
TrainConfig. Re-running with the same workdir resumes from the latest checkpoint.
"""

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from phi_jax import batch as batch_fields
from phi_jax import metrics as metrics_lib
from phi_jax import sharding, token_rows
from phi_jax.checkpoint import TrainCheckpoints, data_checkpointable, load_model
from phi_jax.config import PhiConfig, tiny
from phi_jax.data.tokenizer import copy_tokenizer_files
from phi_jax.errors import PhiJaxError
from phi_jax.files import replacing
from phi_jax.optimizer import OptimizerConfig
from phi_jax.train_step import DEFAULT_LOSS_CHUNK_SIZE, abstract_state, init_state, jit_eval_step, jit_train_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: PhiConfig = dataclasses.field(default_factory=tiny)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mixture: str = "default"
    data_dir: str | None = None
    # "concat": documents joined with EOS and cut to seq_len, as phi was trained; "first_fit":
    # documents packed whole with segment ids, attending only within themselves.
    packing: str = "concat"
    train_steps: int = 100
    batch_size: int = 8  # global, in sequences
    seq_len: int = 128
    microbatches: int = 1
    z_loss: float = 0.0
    # Sequence positions whose full-vocabulary logits the loss computes at once (their gradient too).
    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE
    mesh_shape: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    # The stream is split into this many data shards, batch_size // data_shards rows each, and each
    # process reads the shards of its rows. The batches do not depend on how many processes share
    # them: one process reproduces a multi-host run, and a run resumes on any number of hosts whose
    # rows are whole shards. None: batch_size, one shard per row, which any host count divides.
    data_shards: int | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic evaluation
    eval_steps: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    keep_checkpoint_period: int | None = None  # also keep every M-th step
    init_from: str | None = None  # params checkpoint or Hugging Face directory to start from
    peak_tflops: float | None = None  # per device; by default looked up from the device kind

    def __post_init__(self):
        if self.packing not in ("concat", "first_fit"):
            raise ValueError(f"TrainConfig.packing: expected 'concat' or 'first_fit', found {self.packing!r}")
        if self.batch_size % self.microbatches:
            raise ValueError(f"TrainConfig: batch_size {self.batch_size} is not divisible by "
                             f"microbatches {self.microbatches}")
        if self.data_shards is not None and (self.data_shards < 1 or self.batch_size % self.data_shards):
            raise ValueError(f"TrainConfig: data_shards {self.data_shards} does not divide batch_size "
                             f"{self.batch_size}")
        if self.loss_chunk_size < 1:
            raise ValueError(f"TrainConfig.loss_chunk_size: expected a positive number of positions, found "
                             f"{self.loss_chunk_size}")
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"TrainConfig: seq_len {self.seq_len} exceeds the model's "
                             f"max_position_embeddings {self.model.max_position_embeddings}")


    @property
    def segment_aware(self) -> bool:
        """First-fit rows hold whole documents that must not see each other; concat rows attend
        across documents, as phi was trained."""
        return self.packing == "first_fit"


class NonFiniteError(PhiJaxError, RuntimeError):
    pass


def abstract_batch(config: TrainConfig, mesh):
    """The global batch's fields (phi_jax.batch) as ShapeDtypeStructs, sharded over the batch axes."""
    shape, rows = (config.batch_size, config.seq_len), sharding.batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for name, dtype in batch_fields.FIELDS.items()}


def compile_only(config: TrainConfig, mesh=None) -> dict:
    """Lowers and compiles the train step ahead of time; returns the per-device memory estimate."""
    mesh = mesh or sharding.make_mesh(config.mesh_shape)
    with sharding.mesh_context(mesh):
        step = jit_train_step(config.model, config.optimizer, mesh, microbatches=config.microbatches,
                              z_loss=config.z_loss, segment_aware=config.segment_aware,
                              loss_chunk_size=config.loss_chunk_size)
        state = abstract_state(config.model, config.optimizer, mesh)
        compiled = step.trace(state, abstract_batch(config, mesh)).lower().compile()
    analysis = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "alias_size_in_bytes")
    memory = {name: int(getattr(analysis, name, 0) or 0) for name in fields}
    # Donated state aliases its output: count arguments + temporaries + outputs not aliased.
    memory["total_per_device_bytes"] = (memory["argument_size_in_bytes"] + memory["temp_size_in_bytes"]
                                        + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"]
                                        + memory["generated_code_size_in_bytes"])
    return memory


def data_shards_of_rows(config: TrainConfig, first_row: int, rows: int) -> dict:
    """The data shards a process feeding rows first_row .. first_row + rows - 1 of the global batch
    reads: {shard_index, shard_count, local_shards} for phi_jax.data's iterators."""
    shard_count = config.data_shards or config.batch_size
    shard_rows = config.batch_size // shard_count
    if first_row % shard_rows or rows % shard_rows:
        raise ValueError(f"TrainConfig.data_shards={shard_count}: this process feeds rows {first_row}.."
                         f"{first_row + rows - 1} of the batch, not whole data shards of {shard_rows} rows; use "
                         f"a multiple of {config.batch_size // rows} data shards")
    return dict(shard_index=first_row // shard_rows, shard_count=shard_count, local_shards=rows // shard_rows)


def _data_iterators(config: TrainConfig, mesh):
    """(train iterator, eval iterator maker or None, the mixture's tokenizer.json)."""
    from phi_jax import data

    # Token ids past the embedding table would show up only as a NaN loss.
    tokenizer = data.tokenizer_for(config.mixture, config.data_dir)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"mixture {config.mixture!r} was tokenized with {tokenizer.vocab_size} ids "
                         f"({tokenizer.path}) but the model's vocab_size is {config.model.vocab_size}; set the "
                         f"model's vocab_size to at least {tokenizer.vocab_size}")
    first_row, rows = sharding.local_batch_rows(mesh, config.batch_size)
    shard = data_shards_of_rows(config, first_row, rows)
    common = dict(data_dir=config.data_dir, seq_len=config.seq_len, batch_size=rows, packing=config.packing)
    train = data.make_train_iterator(config.mixture, seed=config.seed, **common, **shard)
    make_eval = (lambda: data.make_eval_iterator(config.mixture, **common, **shard)) if config.eval_every else None
    return train, make_eval, tokenizer.path


def _initial_params(config: TrainConfig, tokenizer_file=None):
    """The init_from params; where the data's chat template added tokens (token_rows), their rows set to
    the mean of the trained ones, the vocabulary grown to the experiment's if it has no spare rows."""
    if not config.init_from:
        return None
    loaded_config, params = load_model(config.init_from, scan_layers=config.model.scan_layers)
    added = token_rows.added_tokens(tokenizer_file)
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim",
                    "rotary_dim")
    mismatched = [k for k in shape_fields if getattr(loaded_config, k) != getattr(config.model, k)
                  and not (k == "vocab_size" and added and loaded_config.vocab_size < config.model.vocab_size)]
    if mismatched:
        differences = ", ".join(f"{k}={getattr(loaded_config, k)} vs {getattr(config.model, k)}" for k in mismatched)
        raise ValueError(f"init_from {config.init_from}: its model differs from the experiment's in {mismatched}: "
                         + differences)
    if added:
        logger.info(f"init_from {config.init_from}: rows of the chat template's tokens {added[0]} set to the mean "
                    f"of the {added[1]} trained rows")
        params = token_rows.with_token_rows(params, added[0].values(), added[1], config.model.vocab_size)
    return params


def train(config: TrainConfig, workdir, *, train_iterator=None, make_eval_iterator=None,
          gin_config: str | None = None, progress: bool = True) -> dict:
    """Trains to `config.train_steps`, resuming from WORKDIR/checkpoints. Returns the last metrics.

    `gin_config`, the operative config, goes into every checkpoint and, once the workdir is known to
    hold this model's run, into WORKDIR/config.gin.

    `train_iterator` / `make_eval_iterator` replace the mixture's data (tests, custom pipelines):
    an iterator of host-local batches (dicts of [local batch, seq_len] numpy arrays, the fields of
    phi_jax.batch). A grain DatasetIterator's position is saved in each checkpoint and resumed exactly; any
    other iterator's cannot be, so a resumed run starts it again from its beginning (and says so).
    """
    mesh = sharding.make_mesh(config.mesh_shape)
    tokenizer_file = None  # the caller's own iterators: their tokenizer is theirs to know
    if train_iterator is None:
        train_iterator, make_eval_iterator, tokenizer_file = _data_iterators(config, mesh)
    checkpoints = TrainCheckpoints(workdir, max_to_keep=config.keep_checkpoints,
                                   keep_period=config.keep_checkpoint_period)
    run = _Run(config=config, mesh=mesh, train_iterator=train_iterator, make_eval_iterator=make_eval_iterator,
               data_state=_data_state(train_iterator), checkpoints=checkpoints,
               metadata={"model_config": json.loads(config.model.to_json()), "gin_config": gin_config},
               writer=metrics_lib.MetricsWriter(workdir), tokenizer_file=tokenizer_file)
    with sharding.mesh_context(mesh):
        run.step_fn, run.eval_fn = _jit_steps(config, mesh)
        state = _restore_or_init(run, gin_config)
        start = int(state.step)
        run.bar = _progress_bar(start, config.train_steps, enabled=progress and jax.process_index() == 0)
        run.meter = _Throughput(config, mesh)
        run.preemption = _Preemption()
        try:
            last = _step_loop(run, state, start)
            checkpoints.wait()
        finally:
            run.preemption.restore()
            run.bar.close()
            run.writer.close()
            checkpoints.close()
    return last


@dataclasses.dataclass
class _Run:
    """What the step loop works with, set up once by `train`."""
    config: TrainConfig
    mesh: Any
    train_iterator: Any
    make_eval_iterator: Any
    data_state: Any  # the train iterator when checkpoints can hold its position, else None
    checkpoints: TrainCheckpoints
    metadata: dict
    writer: metrics_lib.MetricsWriter
    step_fn: Any = None
    eval_fn: Any = None
    bar: Any = None
    meter: "_Throughput | None" = None
    preemption: "_Preemption | None" = None
    tokenizer_file: Any = None  # the data's tokenizer.json, kept in the workdir; None with the caller's iterators


def _data_state(train_iterator):
    """The iterator whose position each checkpoint saves, or None (said once) when it cannot be saved."""
    if data_checkpointable(train_iterator):
        return train_iterator
    logger.warning(f"train_iterator is a {type(train_iterator).__name__}, not a grain iterator: checkpoints cannot "
                   "hold its position, so a resumed run starts it again from its beginning")
    return None


def _jit_steps(config: TrainConfig, mesh):
    """The jitted train step and eval step."""
    step_fn = jit_train_step(config.model, config.optimizer, mesh, microbatches=config.microbatches,
                             z_loss=config.z_loss, segment_aware=config.segment_aware,
                             loss_chunk_size=config.loss_chunk_size)
    eval_fn = jit_eval_step(config.model, mesh, config.segment_aware, config.loss_chunk_size)
    return step_fn, eval_fn


def _restore_or_init(run: _Run, gin_config: str | None):
    """The latest checkpoint's state, or a fresh one; then WORKDIR/config.gin and the data's tokenizer
    files (so that generate, eval and export-hf of the workdir need no --tokenizer) are written."""
    config, mesh, checkpoints = run.config, run.mesh, run.checkpoints
    restored_step, state = checkpoints.restore_latest(
        abstract_state(config.model, config.optimizer, mesh), run.data_state, config.model)
    if restored_step is None:
        state = init_state(config.model, config.optimizer, mesh, config.seed,
                           params=_initial_params(config, run.tokenizer_file))
    else:
        logger.info(f"resumed from {checkpoints.directory / str(restored_step)}")
    if gin_config is not None and jax.process_index() == 0:
        # Not before the restore: a workdir refused as another model's run keeps its own config.
        with replacing(checkpoints.directory.parent / "config.gin") as tmp:
            tmp.write_text(gin_config)
    if run.tokenizer_file is not None and jax.process_index() == 0:
        copy_tokenizer_files(run.tokenizer_file, checkpoints.directory.parent)
    return state


def _step_loop(run: _Run, state, start: int) -> dict:
    """Steps from `start` to train_steps (or a preemption); returns the last metrics."""
    config, last, pending = run.config, {}, None
    for step in range(start, config.train_steps):
        batch = sharding.global_batch(run.mesh, next(run.train_iterator), config.batch_size)
        state, step_metrics = run.step_fn(state, batch)
        # Check the previous step's metrics now that this one is queued: the device stays busy.
        _check_finite(pending)
        pending = (step + 1, step_metrics)
        run.meter.steps += 1
        done = step + 1
        if done % config.log_every == 0 or done == config.train_steps:
            _check_finite(pending)
            last = _log_metrics(run, done, step_metrics)
        if config.eval_every and done % config.eval_every == 0 and run.make_eval_iterator:
            last.update(_periodic_eval(run, done, state))
        stopping = _checkpoint(run, done, state, pending)
        run.bar.update(1)
        if stopping:
            run.checkpoints.wait()
            logger.warning(f"preempted (SIGTERM): saved step {done} to {run.checkpoints.directory}; exiting")
            break
    return last


def _log_metrics(run: _Run, done: int, step_metrics) -> dict:
    """The step's metrics with the throughput since the last log, written and shown on the bar."""
    metrics = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
    metrics.update(run.meter.read())
    run.writer.write(done, metrics)
    run.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_sec']:,.0f}")
    return metrics


def _periodic_eval(run: _Run, done: int, state) -> dict:
    evaluation = evaluate(run.eval_fn, state.params, run.make_eval_iterator(), run.mesh, run.config)
    run.writer.write(done, evaluation)
    run.meter.restart()  # evaluation time is not training throughput
    return evaluation


def _checkpoint(run: _Run, done: int, state, pending) -> bool:
    """Saves when due, when preempted (then returns True) and at the last step."""
    config = run.config
    run.checkpoints.check()
    stopping = run.preemption.requested()
    if stopping or done % config.checkpoint_every == 0 or done == config.train_steps:
        _check_finite(pending)
        run.checkpoints.save(done, state, run.data_state, run.metadata, force=stopping or done == config.train_steps)
    return stopping


class _Throughput:
    """Tokens/s, step time and MFU over the steps since the last reading."""

    def __init__(self, config: TrainConfig, mesh):
        self.tokens_per_step = config.batch_size * config.seq_len
        self.flops_per_token = metrics_lib.train_flops_per_token(config.model, config.seq_len)
        self.peak_tflops = config.peak_tflops or metrics_lib.peak_tflops_per_device()
        self.devices = mesh.size
        self.steps = 0
        self.restart()

    def restart(self):
        self.since = time.perf_counter()

    def read(self) -> dict:
        now = time.perf_counter()
        elapsed, self.since = now - self.since, now
        tokens_per_sec = self.steps * self.tokens_per_step / elapsed
        reading = dict(tokens_per_sec=tokens_per_sec, step_time=elapsed / self.steps,
                       mfu=metrics_lib.mfu(tokens_per_sec, self.flops_per_token, self.peak_tflops, self.devices))
        self.steps = 0
        return reading


class _Preemption:
    """SIGTERM (TPU maintenance, SLURM preemption, Kubernetes) asks the loop to finish its step,
    save and stop; a second SIGTERM ends the process at once. Every process stops at the same step:
    with several processes, the request is shared each step."""

    def __init__(self):
        self._requested = False
        self._previous = signal.getsignal(signal.SIGTERM)
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self._requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self._requested = True
        logger.warning("SIGTERM: finishing this step, then saving and exiting (send again to exit at once)")

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._requested
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.array(self._requested)).any())

    def restore(self):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(pending):
    """Stops at a NaN or inf loss or gradient norm. The loss is computed from the params before the
    step, so a bad gradient leaves it finite while the params after the step, the ones saved, are NaN."""
    if pending is None:
        return
    step, step_metrics = pending
    names = ("loss", "grad_norm")
    for name, value in zip(names, jax.device_get([step_metrics[name] for name in names])):
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} is {value} at step {step}; stopping (checkpoints before step {step} "
                                 "are kept)")


def evaluate(eval_fn, params, iterator, mesh, config: TrainConfig) -> dict:
    total, weight = 0.0, 0.0
    for _, local_batch in zip(range(config.eval_steps), iterator):
        sums = eval_fn(params, sharding.global_batch(mesh, local_batch, config.batch_size))
        total, weight = total + float(sums["ce"]), weight + float(sums["weight"])
    loss = total / max(weight, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": weight}


def _progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, disable=not enabled, desc="train", dynamic_ncols=True)
