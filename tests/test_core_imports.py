"""The core imports without the data edge: the lent GPU machines have the JAX stack but no TensorFlow,
seqio, grain or gin. (tests/test_data.py checks the CLI and phi_jax.data the same way; this one runs in
the core selection, `-m core`, under the newest jax too.)"""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.core

BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio", "grain", "gin", "array_record")
CORE = ("phi_jax", "phi_jax.config", "phi_jax.model", "phi_jax.attention", "phi_jax.attention.xla",
        "phi_jax.attention.flash", "phi_jax.attention.pallas_gpu", "phi_jax.attention.pallas_tpu",
        "phi_jax.attention.cudnn", "phi_jax.sharding", "phi_jax.optimizer", "phi_jax.train_step", "phi_jax.hf",
        "phi_jax.checkpoint", "phi_jax.generate", "phi_jax.files", "phi_jax.metrics", "phi_jax.distributed",
        "phi_jax.trainer", "phi_jax.serving.engine")


def test_the_core_imports_no_tensorflow_seqio_grain_or_gin():
    code = f"""
import importlib, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # importing one now raises ModuleNotFoundError naming it
for name in {CORE!r}:
    importlib.import_module(name)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
