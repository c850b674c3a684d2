"""phi-jax import-hf / export-hf / generate, driven through the CLI entry point."""

import json
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from phi_jax import checkpoint, cli, hf, tiny
from phi_jax.generate import generate
from phi_jax.model import init_params
from tests.cli_runner import run

CONFIG = tiny(vocab_size=256, hidden_size=32, intermediate_size=64, num_heads=2, head_dim=16, rotary_dim=8)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "hf_src"
    hf.save(CONFIG, init_params(CONFIG, jax.random.key(0)), path)
    return path


def weights(path):
    return safetensors.numpy.load_file(path / "model.safetensors")


@pytest.mark.parametrize("scan", [[], ["--scan_layers"]])
def test_import_then_export_gives_back_the_same_tensors(tmp_path, hf_dir, capsys, scan):
    status, out, _ = run(capsys, "import-hf", hf_dir, tmp_path / "ckpt", *scan)
    assert status == 0 and "parameters" in out
    config, _ = checkpoint.load_params(tmp_path / "ckpt")
    assert config.scan_layers == bool(scan)
    assert run(capsys, "export-hf", tmp_path / "ckpt", tmp_path / "out")[0] == 0
    original, exported = weights(hf_dir), weights(tmp_path / "out")
    assert original.keys() == exported.keys()
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


def test_export_in_bfloat16_and_sharded(tmp_path, hf_dir, capsys):
    run(capsys, "import-hf", hf_dir, tmp_path / "ckpt")
    status, _, _ = run(capsys, "export-hf", tmp_path / "ckpt", tmp_path / "out", "--dtype", "bfloat16",
                       "--max_shard_size", "40KiB")
    assert status == 0
    shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    tensors = {}
    for shard in shards:
        tensors.update(safetensors.numpy.load_file(shard))
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    original = weights(hf_dir)
    for name, tensor in tensors.items():
        np.testing.assert_allclose(tensor.astype(np.float32), original[name], rtol=1e-2, atol=1e-6)


def test_checkpoint_relays_params_when_scan_layers_changes(tmp_path, hf_dir):
    config, params = hf.load(hf_dir)
    checkpoint.save_params(tmp_path / "ckpt", config, params)
    scanned_config, scanned = checkpoint.load_params(tmp_path / "ckpt", scan_layers=True)
    assert scanned["layers"]["mlp"]["fc1"]["kernel"].shape == (CONFIG.num_layers, 32, 64)
    np.testing.assert_array_equal(scanned["layers"]["mlp"]["fc1"]["kernel"][1],
                                  params["layers_1"]["mlp"]["fc1"]["kernel"])


def test_generate_prints_the_greedy_continuation(hf_dir, capsys):
    status, out, _ = run(capsys, "generate", hf_dir, "--prompt_ids", "5, 17,200", "--max_new_tokens", "7")
    assert status == 0
    config, params = hf.load(hf_dir)
    expected = generate(config, params, np.array([[5, 17, 200]], np.int32), 7)[0, 3:]
    assert [int(t) for t in out.split()] == expected.tolist()


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path, hf_dir, capsys):
    status, _, err = run(capsys, "import-hf", tmp_path / "nowhere", tmp_path / "ckpt")
    assert status == 2 and "nowhere: no config.json" in err
    assert not (tmp_path / "ckpt").exists()

    status, _, err = run(capsys, "export-hf", hf_dir, tmp_path / "out")
    assert status == 0
    before = weights(tmp_path / "out")
    status, _, err = run(capsys, "export-hf", hf_dir, tmp_path / "out")
    assert status == 2 and "already exists" in err
    jax.tree.map(np.testing.assert_array_equal, weights(tmp_path / "out"), before)

    status, _, err = run(capsys, "generate", hf_dir, "--prompt_ids", "3,999")
    assert status == 2 and "prompt token 999 is outside the vocabulary (size 256)" in err
    status, _, err = run(capsys, "export-hf", tmp_path, tmp_path / "out2")
    assert status == 2 and "not a training workdir (checkpoints/), a phi-jax params checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--prompt_ids", "a,b"], "expected token ids"),
    (["generate", "x", "--prompt_ids", "1", "--max_new_tokens", "0"], "positive integer"),
    (["export-hf", "x", "y", "--max_shard_size", "lots"], "is not a size"),
    (["export-hf", "x", "y", "--dtype", "int8"], "invalid choice"),
])
def test_argument_errors_name_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--gin_file=tiny_cpu", "--gin.TRAIN_STEPS=1", "--gin_bindings=OptimizerConfig.warmup_steps=0",
     "--workdir=gs://bucket/run"],
    ["export-hf", "gs://bucket/run", "out"],
    ["import-hf", "hf_src", "s3://bucket/ckpt"],
    ["generate", "gs://bucket/run", "--prompt_ids", "1"],
])
def test_url_paths_are_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, argv):
    # pathlib reads gs://bucket/run as the local directory gs:/bucket/run.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "URLs are not supported; give a path on a mounted filesystem" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sizes_parse_like_hugging_face():
    assert cli.parse_size("2GB") == 2 * 10**9
    assert cli.parse_size("500MiB") == 500 * 2**20
    assert cli.parse_size("1234") == 1234


def test_module_entry_point_shows_help():
    result = subprocess.run([sys.executable, "-m", "phi_jax.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "import-hf" in result.stdout


TRAIN_FAST = ["--gin_file=tiny_cpu", "--gin.TRAIN_STEPS=40", "--gin.LOG_EVERY=20", "--gin.EVAL_EVERY=40",
              "--gin.CHECKPOINT_EVERY=40", "--gin_bindings=tiny.num_layers=1",
              "--gin_bindings=TrainConfig.eval_steps=2"]


@pytest.mark.slow
def test_train_the_tiny_experiment_then_export_and_sample(tmp_path, capsys):
    status, out, err = run(capsys, "train", f"--workdir={tmp_path / 'run'}", *TRAIN_FAST)
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5
    assert any("eval_perplexity" in r for r in records)
    assert "tiny.num_layers = 1" in (tmp_path / "run" / "config.gin").read_text()
    status, out, _ = run(capsys, "train", f"--workdir={tmp_path / 'run'}", *TRAIN_FAST)
    assert status == 0 and "nothing to train" in out

    assert run(capsys, "export-hf", tmp_path / "run", tmp_path / "hf")[0] == 0
    config, _ = hf.load(tmp_path / "hf")
    assert (config.num_layers, config.vocab_size) == (1, 4096)
    status, out, _ = run(capsys, "generate", tmp_path / "run", "--prompt", "def add(a, b):", "--tokenizer", "default",
                         "--max_new_tokens", "5")
    assert status == 0 and out.startswith("def add(a, b):")

    # eval reads the same workdir and leaves its results there.
    docs = [{"id": f"q{i}", "question": question, "answerKey": "A",
             "choices": {"text": ["return a + b", "import os"], "label": ["A", "B"]}}
            for i, question in enumerate(["What does add do?", "Which line adds?"])]
    (tmp_path / "data" / "arc_easy").mkdir(parents=True)
    (tmp_path / "data" / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    status, out, err = run(capsys, "eval", "arc_easy", "--checkpoint", tmp_path / "run", "--tokenizer", "default",
                           "--data_dir", tmp_path / "data")
    assert status == 0, err
    result = json.loads((tmp_path / "run" / "eval_results.json").read_text())["tasks"]["arc_easy"]
    assert (result["num_docs"], result["step"], result["checkpoint"]) == (2, 40, str((tmp_path / "run").resolve()))
    from phi_jax.data import load_tokenizer
    from phi_jax.evaluation import harness

    direct, _ = harness.evaluate_task("arc_easy", *checkpoint.load_model(tmp_path / "run"), load_tokenizer(None),
                                      tmp_path / "data")
    assert result["metrics"] == pytest.approx(direct["metrics"])  # the workdir's model, with its tokenizer
    status, _, err = run(capsys, "eval", "arc_easy", "--checkpoint", tmp_path / "run", "--tokenizer", "default",
                         "--data_dir", tmp_path / "data", "--step", 7)
    assert status != 0 and "no checkpoint for step 7; found steps [40]" in err


@pytest.mark.parametrize("argv, message", [
    (["--gin_bindings=TrainConfig.sed=1"], "did you mean 'seed'"),
    (["--gin_bindings=TrainConfg.seed=1"], "did you mean 'TrainConfig'"),
    (["--gin.TRAIN_STEPZ=5"], "no macro 'TRAIN_STEPZ'"),
    (["--gin_bindings=tiny.hiden_size=3"], "did you mean 'hidden_size'"),
])
def test_bad_gin_fails_before_anything_compiles(tmp_path, capsys, argv, message):
    started = time.perf_counter()
    status, _, err = run(capsys, "train", "--gin_file=tiny_cpu", f"--workdir={tmp_path / 'run'}", *argv)
    assert status == 2 and message in err
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "run").exists()


def test_data_dir_comes_from_the_macro_or_the_environment(tmp_path, monkeypatch):
    from phi_jax import data, experiment

    assert experiment.build_train_config(["phi15"], macros={"DATA_DIR": str(tmp_path)}).data_dir == str(tmp_path)
    monkeypatch.setenv("PHI_JAX_DATA_DIR", str(tmp_path))
    assert data.prepared_dir("phi15") == tmp_path


def test_training_a_mixture_without_data_dir_says_how_to_set_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PHI_JAX_DATA_DIR", raising=False)
    status, _, err = run(capsys, "train", "--gin_file=tiny_cpu", "--gin.MIXTURE=phi15", f"--workdir={tmp_path}")
    assert status == 2 and "$PHI_JAX_DATA_DIR, or pass --gin.DATA_DIR=PATH to `phi-jax train`" in err


def test_resuming_with_another_model_is_a_one_line_error(tmp_path, capsys):
    argv = ["train", "--gin_file=tiny_cpu", f"--workdir={tmp_path}", "--gin.TRAIN_STEPS=1", "--gin.EVAL_EVERY=0",
            "--gin_bindings=OptimizerConfig.warmup_steps=0"]
    assert run(capsys, *argv, "--gin_bindings=tiny.num_layers=1")[0] == 0
    status, _, err = run(capsys, *argv, "--gin_bindings=tiny.num_layers=2", "--gin.TRAIN_STEPS=2")
    assert status == 2 and "Traceback" not in err
    assert (f"phi-jax train: error: workdir {tmp_path} was trained with a different model: "
            "num_layers=1 there, 2 now") in err
    assert "tiny.num_layers = 1" in (tmp_path / "config.gin").read_text()


def test_missing_gin_file_is_named(tmp_path, capsys):
    status, _, err = run(capsys, "train", "--gin_file=nope.gin", f"--workdir={tmp_path}")
    assert status == 2 and "gin file 'nope.gin' not found" in err


def test_compile_only_prints_the_memory_estimate(capsys):
    status, out, err = run(capsys, "train", "--gin_file=tiny_cpu", "--compile_only", "--gin.MESH_SHAPE={'fsdp': 8}")
    assert status == 0, err
    assert "total_per_device_bytes" in out and "GiB" in out
