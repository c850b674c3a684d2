"""One tokenizer resolver for every command: --tokenizer, else the checkpoint's own (import-hf keeps the
Hugging Face directory's; tests/test_instruct_export.py has the training workdir's)."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from phi_jax import hf, tiny
from phi_jax.data import load_tokenizer
from phi_jax.data.tokenizer import (
    Tokenizer,
    TokenizerNotFoundError,
    copy_tokenizer_files,
    resolve_tokenizer,
    train_byte_level_bpe,
)
from phi_jax.model import init_params
from tests.cli_runner import run


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_byte_level_bpe(["def add(a, b):\n    return a + b\n", "The cat sat on the mat. "] * 20, 300, path)
    return path


def test_resolve_prefers_the_flag_then_the_checkpoint_and_says_what_to_pass(tmp_path, small_tokenizer):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    with pytest.raises(TokenizerNotFoundError, match=f"{checkpoint}: no tokenizer.json there; pass --tokenizer"):
        resolve_tokenizer(None, checkpoint)
    with pytest.raises(TokenizerNotFoundError, match="no checkpoint to read it from"):
        resolve_tokenizer()
    assert resolve_tokenizer(None, checkpoint, required=False) is None

    assert copy_tokenizer_files(small_tokenizer, checkpoint) == ["tokenizer.json"]
    assert resolve_tokenizer(None, checkpoint).fingerprint == Tokenizer(small_tokenizer).fingerprint
    assert resolve_tokenizer("default", checkpoint).fingerprint == load_tokenizer(None).fingerprint
    assert resolve_tokenizer(str(small_tokenizer.parent), tmp_path / "nowhere").path == small_tokenizer
    with pytest.raises(FileNotFoundError, match="nowhere: no tokenizer.json there"):
        resolve_tokenizer(tmp_path / "nowhere", checkpoint)


def test_import_hf_keeps_the_tokenizer_files_of_the_hugging_face_directory(tmp_path, capsys, small_tokenizer):
    config = tiny(vocab_size=320, hidden_size=32, intermediate_size=64, num_heads=2, head_dim=16, rotary_dim=8,
                  num_layers=1)
    source = tmp_path / "hf"
    hf.save(config, init_params(config, jax.random.key(0)), source)
    tokenizer_config = {"eos_token": "<|endoftext|>", "chat_template": "{{ messages[0]['content'] }}"}
    (source / "tokenizer.json").write_bytes(small_tokenizer.read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    assert run(capsys, "import-hf", source, tmp_path / "ckpt")[0] == 0
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text()) == tokenizer_config
    status, out, err = run(capsys, "generate", tmp_path / "ckpt", "--prompt", "The cat", "--max_new_tokens", 3)
    assert status == 0 and out.startswith("The cat"), err


def test_text_prompts_without_any_tokenizer_fail_before_the_model_loads(tmp_path, capsys):
    status, _, err = run(capsys, "generate", tmp_path, "--prompt", "x")
    assert status == 2 and f"{tmp_path}: no tokenizer.json there; pass --tokenizer" in err


def test_the_resolver_imports_no_tensorflow_seqio_grain_or_gin(small_tokenizer):
    code = f"""
import sys
for name in ("tensorflow", "seqio", "grain", "gin", "array_record"):
    sys.modules[name] = None
from phi_jax.data.tokenizer import resolve_tokenizer
print(resolve_tokenizer({str(small_tokenizer)!r}).encode("The cat"))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(Tokenizer(small_tokenizer).encode("The cat"))
