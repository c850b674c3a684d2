"""One base exception for the project's errors, reported once, at the CLI boundary."""

import ast
import importlib
import pathlib

import pytest

from phi_jax import checkpoint, cli
from phi_jax.errors import PhiJaxError

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "phi_jax"
# jail.py runs alone in the sandbox's child process (`python -I -S jail.py`: standard library only),
# and its SetupError never leaves that process: the sandbox turns it into SandboxUnavailable.
OUTSIDE = {("phi_jax.evaluation.jail", "SetupError")}


def _exception_classes():
    """(module, class) for every exception class defined in phi_jax (found in the source, then imported)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        classes = [node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)]
        if not classes:
            continue
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        loaded = importlib.import_module(module)
        found += [(module, name) for name in classes
                  if isinstance(getattr(loaded, name, None), type) and issubclass(getattr(loaded, name), BaseException)]
    return found


def test_every_error_class_of_the_project_derives_from_phi_jax_error():
    classes = _exception_classes()
    names = {name for _, name in classes}
    assert {"ExperimentError", "DataError", "CheckpointSaveError", "CheckpointRestoreError", "ModelMismatchError",
            "DataPositionError", "NonFiniteError", "HFCheckpointError", "SandboxUnavailable"} <= names
    outside = [(module, name) for module, name in classes
               if (module, name) not in OUTSIDE and not issubclass(getattr(importlib.import_module(module), name),
                                                                   PhiJaxError)]
    assert not outside, f"not PhiJaxError subclasses: {outside}"
    # Callers that catch the builtin bases still catch them.
    from phi_jax.data.registry import DataError
    from phi_jax.trainer import NonFiniteError

    assert issubclass(DataError, ValueError) and issubclass(NonFiniteError, RuntimeError)


def test_any_project_error_of_any_command_is_one_line_and_status_2(monkeypatch, tmp_path, capsys):
    from phi_jax.trainer import NonFiniteError

    def fails(*args, **kwargs):
        raise NonFiniteError("loss is nan at step 3")  # a RuntimeError: a traceback before the common base

    monkeypatch.setattr(checkpoint, "load_model", fails)
    assert cli.main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "phi-jax export-hf: error: loss is nan at step 3\n"

    assert cli.main(["train", "--gin_file=tiny_cpu", f"--workdir={tmp_path}", "--gin.TRAIN_STEPS"]) == 2
    assert capsys.readouterr().err == "phi-jax train: error: '--gin.TRAIN_STEPS': expected --gin.MACRO=VALUE\n"


def test_errors_that_are_not_the_projects_keep_their_traceback(monkeypatch, tmp_path):
    def fails(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(checkpoint, "load_model", fails)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")])
