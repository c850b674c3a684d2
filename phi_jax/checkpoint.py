"""Orbax checkpoints of a model: params plus the PhiConfig that gives them meaning.

A params checkpoint is a directory holding `phi_config.json` and `params/` (Orbax). `phi-jax
import-hf` writes one; `phi-jax export-hf` and `phi-jax generate` read one.
"""

import pathlib

import jax
import orbax.checkpoint as ocp

from phi_jax.config import PhiConfig
from phi_jax.files import atomic_directory
from phi_jax.model import stack_layers, unstack_layers

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
    config = saved.replace(**config_changes)
    if saved.scan_layers and not config.scan_layers:
        params = unstack_layers(params, config.num_layers)
    elif config.scan_layers and not saved.scan_layers:
        params = stack_layers(params, config.num_layers)
    return config, jax.tree.map(jax.numpy.asarray, params)
