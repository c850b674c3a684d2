"""The edge between phi_jax.data and a tasks module, in plain Python (no TensorFlow, seqio or grain).

A tasks module says what the mixtures are. `phi-jax data ... --tasks_module NAME` (default
`data_tasks`) imports it with importlib, so a team's own `my_project.tasks` needs no edit of phi_jax;
nothing in phi_jax imports it otherwise. It has

  MIXTURES    {mixture: {task: share of training tokens}}: plain Python, read without importing
              TensorFlow, so a misspelled name is refused at once. A task's own name is a mixture of
              that task alone.
  register(data_dir, tokenizer)
              registers every task those mixtures name with seqio (the seqio import goes here), reading
              DATA_DIR (None: no DATA_DIR was given) and tokenized with the tokenizer.json at
              `tokenizer` (None: the task's own). `phi-jax data prepare` calls it in each process that
              runs a task's pipeline, spawned workers included, which import the module themselves.
  describe_task(name) -> str   (optional) what a task reads, for `phi-jax data list`.
  CHAT_TASKS  (optional) {task: default chat template or None}: the tasks whose examples are
              {"targets", "loss_mask"} conversations (data_tasks.chat_tasks); `prepare` gives them a
              chat template beside the tokenizer it registers them with (phi_jax.data.prepare).

`phi-jax data prepare` writes each mixture's token shares, with the fingerprint of the tokenizer,
into the prepared directory (phi_jax.data.shards); the training stream reads them from there and
never imports a tasks module: training needs neither TensorFlow nor seqio.
"""

import difflib
import importlib
import types

from phi_jax.errors import PhiJaxError

DEFAULT_TASKS_MODULE = "data_tasks"
SPLITS = ("train", "validation")


class DataError(PhiJaxError, ValueError):
    """Bad data configuration or input: the message names the path, the task or key, and the fix."""


def did_you_mean(name: str, known) -> str:
    """' (did you mean 'x'?)' for the closest of `known`, or ''."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_tasks_module(name: str) -> types.ModuleType:
    """The tasks module `name`, imported; refused, naming what is missing, if it is not one."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise  # the module exists but imports something that does not
        raise DataError(f"--tasks_module {name!r}: no module {e.name!r} on the Python path (sys.path, "
                        f"$PYTHONPATH); give an importable module name such as my_project.tasks") from None
    missing = [attr for attr in ("MIXTURES", "register") if not hasattr(module, attr)]
    if missing:
        raise DataError(f"--tasks_module {name!r} ({module.__file__}) has no {' and no '.join(missing)}: a tasks "
                        "module defines MIXTURES = {mixture: {task: token share}} and register(data_dir, "
                        "tokenizer) (see phi_jax/data/registry.py)")
    return module


def tasks_of(module) -> list[str]:
    """Every task the module's mixtures name, sorted."""
    return sorted({task for shares in module.MIXTURES.values() for task in shares})


def mixture_shares(module, name: str) -> dict[str, float]:
    """{task: token share} of a mixture of the tasks module, or {name: 1.0} for one of its tasks;
    shares sum to 1. A name the module does not define is refused with the closest one."""
    if name in module.MIXTURES:
        shares = {task: float(share) for task, share in module.MIXTURES[name].items()}
    elif name in tasks_of(module):
        shares = {name: 1.0}
    else:
        known = set(module.MIXTURES) | set(tasks_of(module))
        raise DataError(f"unknown mixture or task {name!r} in tasks module {module.__name__!r}"
                        f"{did_you_mean(name, known)}; known: {', '.join(sorted(known))}")
    shares = {task: share for task, share in shares.items() if share > 0}
    total = sum(shares.values())
    if not shares or total <= 0:
        raise DataError(f"mixture {name!r} of tasks module {module.__name__!r} has no task with a positive share")
    return {task: share / total for task, share in shares.items()}
