"""Orbax checkpoints: a model's params alone, and a training run's steps.

A params checkpoint is a directory holding `phi_config.json` and `params/` (Orbax). `phi-jax
import-hf` writes one; `phi-jax export-hf`, `phi-jax generate` and fine-tuning read one. A training
run keeps its steps under WORKDIR/checkpoints (`TrainCheckpoints`); `load_train_params` reads the
params of one of them.
"""

import dataclasses
import json
import logging
import pathlib
import sys

import jax
import orbax.checkpoint as ocp

from phi_jax import hf
from phi_jax.config import PhiConfig
from phi_jax.errors import PhiJaxError
from phi_jax.files import atomic_directory, local_path
from phi_jax.model import stack_layers, unstack_layers

logger = logging.getLogger(__name__)

CONFIG_FILE = "phi_config.json"
PARAMS_DIR = "params"


def save_params(path, config: PhiConfig, params, overwrite: bool = False):
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / PARAMS_DIR).absolute(), params)
        checkpointer.wait_until_finished()


def load_params(path, **config_changes) -> tuple[PhiConfig, dict]:
    """(config, params) from `save_params`' directory; params relaid if `scan_layers` changes."""
    path = pathlib.Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: not a phi-jax params checkpoint (no {CONFIG_FILE}); "
                                "`phi-jax import-hf` writes one from a Hugging Face directory")
    saved = PhiConfig.from_json(config_file.read_text(), source=str(config_file))
    params = ocp.StandardCheckpointer().restore((path / PARAMS_DIR).absolute())
    return _relaid(saved, jax.tree.map(jax.numpy.asarray, params), config_changes)


def _relaid(saved: PhiConfig, params, config_changes: dict):
    """(saved config with `config_changes`, params laid out for it: stacked or not by scan_layers)."""
    config = saved.replace(**config_changes)
    if saved.scan_layers != config.scan_layers:
        params = (stack_layers if config.scan_layers else unstack_layers)(params, config.num_layers)
    return config, params


class CheckpointSaveError(PhiJaxError, RuntimeError):
    pass


class CheckpointRestoreError(PhiJaxError, RuntimeError):
    pass


class ModelMismatchError(PhiJaxError, ValueError):
    pass


class DataPositionError(PhiJaxError, ValueError):
    """The checkpoint's data-iterator position cannot place this run's data iterator."""


# How the model runs, not what its parameters mean: a run may resume with these changed (another
# remat policy or attention kernel for other chips, another compute dtype or dropout).
RESUMABLE_MODEL_CHANGES = ("dtype", "remat", "attention_impl", "attention_interpret", "embed_dropout",
                           "attention_dropout", "residual_dropout", "initializer_range")


class TrainCheckpoints:
    """Training checkpoints under WORKDIR/checkpoints/<step>/: `state` (the TrainState), `data`
    (the data iterator's state, one file per process) and `metadata` (model config, gin config).

    Saves are asynchronous. Orbax's background thread can fail a save and only log it; `check`
    (cheap, call it every step) turns such a failure into an exception in the training loop as soon
    as the save has finished. A step directory appears only once complete (Orbax writes to a
    temporary name and renames), and `restore_latest` falls back past a damaged one; it refuses a
    workdir trained with another model rather than call its checkpoints damaged.
    """

    def __init__(self, workdir, *, max_to_keep: int | None = 3, keep_period: int | None = None):
        self.directory = (local_path(workdir) / "checkpoints").absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period, enable_async_checkpointing=True, create=True))
        self._unconfirmed_step = None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_iterator, metadata: dict, force: bool = False):
        if self._unconfirmed_step is not None:
            self._confirm()  # one save at a time: wait for the previous one and check it landed
        items = {"state": ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave(metadata)}
        if data_iterator is not None:
            items["data"] = DataSave(data_iterator)
        if self._manager.save(step, args=ocp.args.Composite(**items), force=force):
            self._unconfirmed_step = step

    def check(self):
        """Raises CheckpointSaveError if the last background save has finished and failed."""
        if self._unconfirmed_step is not None and not self._manager.is_saving_in_progress():
            self._confirm()

    def _confirm(self):
        step, self._unconfirmed_step = self._unconfirmed_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveError(f"{self.directory}: saving step {step} failed: {e!r}") from e
        if step not in self._manager.all_steps():
            raise CheckpointSaveError(f"{self.directory}: saving step {step} failed (see the log above)")

    def restore(self, step: int, abstract_state, data_iterator):
        """The TrainState at `step`, laid out as `abstract_state` says (any mesh); the data iterator
        is rewound to where it was, or left at its start when the run saved no data position (it
        trained from an iterator a checkpoint cannot hold)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and not (self.directory / str(step) / "data").is_dir():
            logger.warning(f"checkpoint {self.directory / str(step)} holds no data position: the data iterator "
                           "starts from its beginning")
        elif data_iterator is not None:
            items["data"] = DataRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_latest(self, abstract_state, data_iterator, model: PhiConfig):
        """(step, state) of the newest checkpoint that restores, or (None, None) when there are none.

        A checkpoint of another `model` (beyond RESUMABLE_MODEL_CHANGES) raises ModelMismatchError, one
        whose data position `data_iterator` cannot take DataPositionError. A damaged step (missing or
        truncated files) is reported and skipped; if none restores, this raises rather than let the run
        start over from scratch."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                self._check_model(step, model)
                return step, self.restore(step, abstract_state, data_iterator)
            except (ModelMismatchError, DataPositionError):
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: try the one before
                logger.warning(f"checkpoint {self.directory / str(step)} is damaged and skipped: {e!r}"[:2000])
        if steps:
            raise CheckpointRestoreError(f"{self.directory}: none of the checkpoints {steps} could be restored")
        return None, None

    def _check_model(self, step: int, model: PhiConfig):
        metadata = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
        saved, current = metadata["model_config"], json.loads(model.to_json())
        changed = [k for k in sorted(saved.keys() | current.keys())
                   if k not in RESUMABLE_MODEL_CHANGES and saved.get(k) != current.get(k)]
        if changed:
            raise ModelMismatchError(
                f"workdir {self.directory.parent} was trained with a different model: "
                + ", ".join(f"{k}={saved.get(k)!r} there, {current.get(k)!r} now" for k in changed)
                + "; resume it with its own model, or train this one in a new workdir")

    def wait(self):
        if self._unconfirmed_step is not None:
            self._confirm()
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def data_checkpointable(iterator) -> bool:
    """Whether a training checkpoint can hold the iterator's position: a grain DatasetIterator's state
    is a JSON dict (DataHandler). Without grain imported, nothing can be a grain iterator (and the
    core never imports it)."""
    grain = sys.modules.get("grain")
    return grain is not None and isinstance(iterator, grain.DatasetIterator)


class DataHandler(ocp.CheckpointHandler):
    """A checkpoint's `data` item: each process's data-iterator state (a JSON dict), in
    process_<i>-of-<n>.json as grain's own handler names them.

    States that name their data shards ({"shard_count": n, "shards": {"<index>": state}}, as
    phi_jax.data's stream has) are merged over all processes on restore, and each iterator takes its
    own shards: a run resumes with another number of processes. Any other state is per process, and
    resumes only with as many processes as saved it."""

    def save(self, directory, args):
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        own.write_text(json.dumps(args.item.get_state()))

    def restore(self, directory, args):
        files = sorted(directory.glob("process_*-of-*.json"))
        states = [json.loads(path.read_text()) for path in files]
        if states and all(isinstance(state, dict) and "shards" in state for state in states):
            state = {"shard_count": states[0]["shard_count"],
                     "shards": {index: shard for state in states for index, shard in state["shards"].items()}}
        else:
            counts = sorted({int(path.stem.rsplit("-of-", 1)[1]) for path in files})
            if counts and counts != [jax.process_count()]:
                raise DataPositionError(
                    f"{directory}: the data-iterator position was saved by {counts[0]} processes and is per "
                    f"process (its iterator does not name data shards): resume with {counts[0]} processes")
            own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            state = json.loads(own.read_text())
        try:
            args.item.set_state(state)
        except ValueError as e:
            raise DataPositionError(f"{directory}: {e}") from e
        return args.item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: object


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: object


def _reader(workdir) -> ocp.CheckpointManager:
    # `data` is named so that Orbax does not warn about an item it cannot read; never restored here.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler(),
                "data": DataHandler()}
    return ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(),
                                 options=ocp.CheckpointManagerOptions(create=False), item_handlers=handlers)


def _chosen_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"{manager.directory}: no training checkpoints")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{manager.directory}: no checkpoint for step {step}; found steps {sorted(steps)}")
    return max(steps) if step is None else step


def checkpoint_step(workdir, step: int | None = None) -> int:
    """The step `load_train_params(workdir, step)` reads: `step` if it was saved, else the latest."""
    return _chosen_step(_reader(workdir), step)


def load_train_params(workdir, step: int | None = None, **config_changes) -> tuple[PhiConfig, dict]:
    """(config, params) of a training run's checkpoint (the latest, or `step`), without the
    optimizer state, onto one device."""
    manager = _reader(workdir)
    step = _chosen_step(manager, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                     manager.item_metadata(step)["state"]["params"])}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True),
        metadata=ocp.args.JsonRestore()))
    return _relaid(PhiConfig(**restored["metadata"]["model_config"]), restored["state"]["params"], config_changes)


def load_model(path, step: int | None = None, **config_changes):
    """(config, params) from a training workdir (its latest step, or `step`), a params checkpoint
    or a Hugging Face directory."""
    path = local_path(path)
    if (path / "checkpoints").is_dir():
        return load_train_params(path, step, **config_changes)
    if (path / CONFIG_FILE).exists():
        return load_params(path, **config_changes)
    if (path / "config.json").exists():
        return hf.load(path, **config_changes)
    raise FileNotFoundError(f"{path}: not a training workdir (checkpoints/), a phi-jax params checkpoint "
                            f"({CONFIG_FILE}) or a Hugging Face directory (config.json)")
