"""What the mixtures are made of, in plain Python (no TensorFlow, seqio or grain).

`data_tasks` registers seqio Tasks and Mixtures from these tables; the grain stream reads the token
shares from here, so streaming prepared shards never has to import TensorFlow.

Shares are fractions of training *tokens* (not documents), from the phi papers:
  phi1            code 6/7, synthetic 1/7   (about 6B filtered code + 1B synthetic textbook tokens)
  phi15           synthetic 0.8, code 0.2   (80% new synthetic + 20% phi-1 data)
  phi15_web       web 0.4, code 0.2, synthetic 0.4
  phi15_web_only  web 0.8, code 0.2
  default         the embedded corpus (Python's stdlib code, its docs, our synthetic textbooks)
"""

import os

from phi_jax.errors import PhiJaxError

SOURCES = ("synthetic", "code", "web")
SPLITS = ("train", "validation")
# The embedded default corpus: task name -> the source directory it reads.
DEFAULT_TASKS = {"default_synthetic": "synthetic", "default_code": "code", "default_web": "web"}

MIXTURES: dict[str, dict[str, float]] = {
    "phi1": {"code": 6 / 7, "synthetic": 1 / 7},
    "phi15": {"synthetic": 0.8, "code": 0.2},
    "phi15_web": {"web": 0.4, "code": 0.2, "synthetic": 0.4},
    "phi15_web_only": {"web": 0.8, "code": 0.2},
    "default": {"default_synthetic": 0.4, "default_code": 0.3, "default_web": 0.3},
}

_settings: dict[str, str | None] = {"data_dir": None, "tokenizer": None}


class DataError(PhiJaxError, ValueError):
    """Bad data configuration or input: the message names the path and the task."""


def set_data_dir(path) -> None:
    """DATA_DIR for the `synthetic`, `code` and `web` tasks (else $PHI_JAX_DATA_DIR)."""
    _settings["data_dir"] = None if path is None else str(path)


def set_tokenizer(path) -> None:
    """The tokenizer.json for those tasks (else $PHI_JAX_TOKENIZER, else DATA_DIR/tokenizer.json)."""
    _settings["tokenizer"] = None if path is None else str(path)


def data_dir(task: str = "") -> str:
    path = _settings["data_dir"] or os.environ.get("PHI_JAX_DATA_DIR")
    if not path:
        raise DataError(f"task {task!r}: no DATA_DIR; pass --data_dir (or set PHI_JAX_DATA_DIR)")
    return path


def tokenizer_path(task: str = "") -> str:
    path = _settings["tokenizer"] or os.environ.get("PHI_JAX_TOKENIZER")
    return path or os.path.join(data_dir(task), "tokenizer.json")


def mixture_shares(name: str) -> dict[str, float]:
    """{task: token share} for a mixture, or {name: 1.0} for a single task. Shares sum to 1.

    Mixtures of this table need no imports; anything else is looked up in the seqio registry (importing
    `data_tasks`), where a Mixture's rates are read as token shares.
    """
    if name in MIXTURES:
        shares = MIXTURES[name]
    elif name in DEFAULT_TASKS or name in SOURCES:
        shares = {name: 1.0}
    else:
        import data_tasks  # noqa: F401  (registers)
        import seqio

        if name in seqio.MixtureRegistry.names():
            mixture = seqio.get_mixture_or_task(name)
            shares = {t.name: float(mixture.get_rate(t)) for t in mixture.tasks}
        elif name in seqio.TaskRegistry.names():
            shares = {name: 1.0}
        else:
            known = sorted(set(MIXTURES) | set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names()))
            raise DataError(f"unknown mixture or task {name!r}; known: {', '.join(known)}")
    shares = {t: s for t, s in shares.items() if s > 0}
    total = sum(shares.values())
    if not shares or total <= 0:
        raise DataError(f"mixture {name!r} has no task with a positive share")
    return {t: s / total for t, s in shares.items()}
