"""gin at the edge: experiment files -> TrainConfig, T5X style.

An experiment file sets uppercase macros at its top (TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, MIXTURE,
DATA_DIR, MESH_SHAPE, LEARNING_RATE, CHECKPOINT_EVERY, EVAL_EVERY, LOG_EVERY, SEED) and binds them into
`TrainConfig`, `OptimizerConfig` and a model preset. `--gin.MACRO=VALUE` overrides a macro,
`--gin_bindings` adds any binding. A macro set to `%gin.REQUIRED` must be given on the command line.
Experiments include each other (`include 'phi15.gin'`, then override a macro). Mistakes fail here,
before anything compiles, with the closest valid names.
"""

import ast
import difflib
import inspect
import logging
import pathlib
import re

import gin

from phi_jax import config as config_lib
from phi_jax import optimizer as optimizer_lib
from phi_jax import trainer
from phi_jax.errors import PhiJaxError

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments"

CONFIGURABLES = {
    "PhiConfig": config_lib.PhiConfig, "phi_1": config_lib.phi_1, "phi_1_5": config_lib.phi_1_5,
    "tiny": config_lib.tiny, "OptimizerConfig": optimizer_lib.OptimizerConfig, "TrainConfig": trainer.TrainConfig,
}
_CONFIGURED = {name: gin.external_configurable(fn, name) for name, fn in CONFIGURABLES.items()}
# `include 'base/train.gin'` and `include 'phi15.gin'` resolve against experiments/ from anywhere.
gin.add_config_file_search_path(str(EXPERIMENTS_DIR))


def _not_gin_probing_the_python_path(record: logging.LogRecord) -> bool:
    """gin tries each search path in turn; its Python-package reader logs an ERROR ("Path not found")
    for every include that is not a package resource, before the experiments/ path finds the file."""
    return not (record.pathname.endswith(("gin/resource_reader.py", "gin\\resource_reader.py"))
                and record.getMessage().startswith("Path not found"))


logging.getLogger().addFilter(_not_gin_probing_the_python_path)


class ExperimentError(PhiJaxError, ValueError):
    pass


def _parameter_names(name: str) -> list[str]:
    fn = CONFIGURABLES[name]
    names = list(inspect.signature(fn).parameters)
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
        # Presets take PhiConfig / OptimizerConfig fields as keyword overrides.
        target = config_lib.PhiConfig if name in ("phi_1", "phi_1_5", "tiny") else optimizer_lib.OptimizerConfig
        names += list(inspect.signature(target).parameters)
    return [n for n in names if n not in ("changes", "self")]


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; valid: {sorted(candidates)}"


def _explain(error: Exception) -> str:
    text = str(error)
    match = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", text)
    if match and match.group(1) in CONFIGURABLES:
        return text.split("\n")[0] + _suggest(match.group(2), _parameter_names(match.group(1))) + "\n" + text
    match = re.search(r"No configurable matching '([\w.]+)'", text)
    if match:
        return text.split("\n")[0] + _suggest(match.group(1), CONFIGURABLES) + "\n" + text
    match = re.search(r"needs decay_steps \((\d+)\) greater than warmup_steps", text)
    if match and {"WARMUP_STEPS", "TRAIN_STEPS"} <= set(_defined_macros()):
        return text.split("\n")[0] + f"; set --gin.WARMUP_STEPS below TRAIN_STEPS ({match.group(1)})"
    match = re.search(r"got an unexpected keyword argument '(\w+)'", text)
    if match:
        fields = _parameter_names("tiny") + _parameter_names("OptimizerConfig") + _parameter_names("TrainConfig")
        return text.split("\n")[0] + _suggest(match.group(1), set(fields)) + "\n" + text
    return text


def _macro_value(text: str) -> str:
    """The gin text for a --gin.MACRO=VALUE value: literals and gin references as given, a bare
    word as a string (so that --gin.MIXTURE=phi15 works without shell-quoted quotes)."""
    try:
        ast.literal_eval(text)
        return text
    except (ValueError, SyntaxError):
        return text if text.startswith(("@", "%")) else repr(text)


def resolve_gin_file(name: str) -> str:
    for candidate in (pathlib.Path(name), EXPERIMENTS_DIR / name, EXPERIMENTS_DIR / f"{name}.gin"):
        if candidate.is_file():
            return str(candidate.resolve())  # absolute: gin then skips its search paths
    raise ExperimentError(f"gin file {name!r} not found (looked in the current directory and {EXPERIMENTS_DIR})")


def _defined_macros() -> list[str]:
    return re.findall(r"^([A-Z][A-Z0-9_]*) = ", gin.config_str(), flags=re.M)


def _refuse_missing_macros(gin_files):
    """gin checks %gin.REQUIRED only where a parameter is bound to it directly, not through a macro.
    (gin holds a constant as a reference to the `gin.constant` configurable under the constant's scope.)"""
    missing = [name for name in _defined_macros() if getattr(gin.query_parameter(f"{name}/macro.value"),
                                                             "scoped_selector", None) == "gin.REQUIRED/gin.constant"]
    if missing:
        flags = " ".join(f"--gin.{name}=VALUE" for name in missing)
        raise ExperimentError(f"{list(gin_files)}: {', '.join(missing)} must be given ({flags})")


def build_train_config(gin_files, bindings=(), macros: dict | None = None) -> trainer.TrainConfig:
    """Parses the experiment and returns its TrainConfig; gin stays configured for `config_str`."""
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in gin_files], list(bindings),
                                            finalize_config=False)
        for name, value in (macros or {}).items():
            try:
                gin.query_parameter(f"{name}/macro.value")
            except ValueError:
                raise ExperimentError(f"--gin.{name}: no macro {name!r} in {list(gin_files)}"
                                      + _suggest(name, _defined_macros())) from None
            gin.parse_config(f"{name} = {_macro_value(value)}")
        _refuse_missing_macros(gin_files)
        return _CONFIGURED["TrainConfig"]()
    except ExperimentError:
        raise
    except (ValueError, TypeError, SyntaxError) as e:
        raise ExperimentError(_explain(e)) from None


def split_macro_flags(argv):
    """(`--gin.NAME=VALUE` flags as {NAME: VALUE}, the other arguments)."""
    macros, rest = {}, []
    for arg in argv:
        match = re.fullmatch(r"--gin\.([A-Za-z_]\w*)=(.*)", arg, flags=re.S)
        if match:
            macros[match.group(1)] = match.group(2)
        elif arg.startswith("--gin."):
            raise ExperimentError(f"{arg!r}: expected --gin.MACRO=VALUE")
        else:
            rest.append(arg)
    return macros, rest


def config_str() -> str:
    return gin.config_str()
