"""gin at the edge: experiment files -> TrainConfig, T5X style.

An experiment file sets uppercase macros at its top (TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, MIXTURE,
DATA_DIR, MESH_SHAPE, LEARNING_RATE, CHECKPOINT_EVERY, EVAL_EVERY, LOG_EVERY, SEED) and binds them into
`TrainConfig`, `OptimizerConfig` and a model preset. `--gin.MACRO=VALUE` overrides a macro,
`--gin_bindings` adds any binding. Mistakes fail here, before anything compiles, with the closest
valid names.
"""

import ast
import difflib
import inspect
import pathlib
import re

import gin

from phi_jax import config as config_lib
from phi_jax import optimizer as optimizer_lib
from phi_jax import trainer

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments"

CONFIGURABLES = {
    "PhiConfig": config_lib.PhiConfig, "phi_1": config_lib.phi_1, "phi_1_5": config_lib.phi_1_5,
    "tiny": config_lib.tiny, "OptimizerConfig": optimizer_lib.OptimizerConfig,
    "phi_1_recipe": optimizer_lib.phi_1_recipe, "phi_1_5_recipe": optimizer_lib.phi_1_5_recipe,
    "TrainConfig": trainer.TrainConfig,
}
_CONFIGURED = {name: gin.external_configurable(fn, name) for name, fn in CONFIGURABLES.items()}
# `include 'base/train.gin'` resolves against experiments/. Put first, because gin logs a spurious
# error for every search path it tries before the one that holds the file.
gin.config._LOCATION_PREFIXES.insert(0, str(EXPERIMENTS_DIR))


class ExperimentError(ValueError):
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
                defined = re.findall(r"^([A-Z][A-Z0-9_]*) = ", gin.config_str(), flags=re.M)
                raise ExperimentError(f"--gin.{name}: no macro {name!r} in {list(gin_files)}"
                                      + _suggest(name, defined)) from None
            gin.parse_config(f"{name} = {_macro_value(value)}")
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
