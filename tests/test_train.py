"""Sharded training: the same losses on any mesh, exact gradient accumulation, the loop's contract."""

import json

import grain
import jax
import numpy as np
import pytest

from phi_jax import tiny
from phi_jax.optimizer import OptimizerConfig, learning_rate_schedule, phi_1_recipe
from phi_jax.sharding import global_batch, local_batch_rows, make_mesh, mesh_context
from phi_jax.train_step import init_state, jit_train_step
from phi_jax.trainer import NonFiniteError, TrainConfig, compile_only, train

MODEL = tiny(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, head_dim=16, rotary_dim=8)
OPTIMIZER = OptimizerConfig(learning_rate=3e-3)
BATCH, SEQ = 8, 32


def make_batches(count, batch=BATCH, seq=SEQ, vocab=MODEL.vocab_size, seed=0):
    """Rows cut from one repeating random sequence: learnable, so the loss can fall."""
    rng = np.random.RandomState(seed)
    pattern = rng.randint(0, vocab, 64)
    batches = []
    for _ in range(count):
        rows = np.stack([np.roll(pattern, -s)[:seq + 1] for s in rng.randint(0, 64, batch)]).astype(np.int32)
        weights = np.ones((batch, seq), np.float32)
        weights[0, : seq // 2] = 0.0  # some padding, so that weighting matters
        batches.append({"tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_weights": weights,
                        "segment_ids": np.ones((batch, seq), np.int32),
                        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))})
    return batches


def run_steps(mesh_shape, batches, devices=None, microbatches=1, model=MODEL):
    mesh = make_mesh(mesh_shape, devices)
    with mesh_context(mesh):
        state = init_state(model, OPTIMIZER, mesh, seed=0)
        step = jit_train_step(model, OPTIMIZER, mesh, microbatches=microbatches)
        losses = []
        for batch in batches:
            state, metrics = step(state, global_batch(mesh, batch, len(batch["tokens"])))
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps({"data": 1}, make_batches(3), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_every_mesh_gives_the_single_device_losses(single_device_run, mesh_shape, capfd):
    assert jax.device_count() == 8
    losses, params = run_steps(mesh_shape, make_batches(3))
    # XLA's partitioner logs when a sharding change can only be done by replicating the whole array.
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    expected_losses, expected_params = single_device_run
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, expected_params)


def test_parameters_are_sharded_as_the_rules_say():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with mesh_context(mesh):
        state = init_state(MODEL, OPTIMIZER, mesh, seed=0)
    assert tuple(state.params["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec) == ("fsdp", "tensor")
    assert tuple(state.params["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec) == ("fsdp", "tensor", None)
    adam_mu = state.opt_state[1][0].mu
    assert tuple(adam_mu["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec) == ("fsdp", "tensor")


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
    losses, params = run_steps({"data": 1}, make_batches(3), devices=jax.devices()[:1], microbatches=4)
    expected_losses, expected_params = single_device_run
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, expected_params)


@pytest.mark.parametrize("shape, message", [
    ({"data": 3}, "needs 3 devices, found 8"),
    ({"data": -1, "fsdp": 3}, "not divisible by 3"),
    ({"batch": 8}, "unknown axes \\['batch'\\]"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
])
def test_bad_mesh_shapes_say_what_they_found(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)


def test_each_process_feeds_its_rows():
    assert local_batch_rows(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), 16) == (0, 16)


def test_phi_1_schedule_warms_up_then_decays():
    schedule = learning_rate_schedule(phi_1_recipe(total_steps=36_000))
    assert float(schedule(0)) == 0.0
    assert float(schedule(750)) == pytest.approx(1e-3)
    assert float(schedule(18_375)) == pytest.approx(5e-4, rel=1e-3)
    assert float(schedule(36_000)) == pytest.approx(0.0, abs=1e-9)


def grain_iterator(batches):
    return grain.MapDataset.source(batches).to_iter_dataset().__iter__()


def loop_config(**changes):
    return TrainConfig(**{"model": MODEL, "optimizer": OPTIMIZER, "train_steps": 30, "batch_size": BATCH,
                          "seq_len": SEQ, "log_every": 10, "checkpoint_every": 10, "mesh_shape": {"data": -1},
                          **changes})


def test_the_loop_trains_logs_and_checkpoints(tmp_path):
    final = train(loop_config(), tmp_path, train_iterator=grain_iterator(make_batches(40)), progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert {"step", "loss", "grad_norm", "learning_rate", "tokens_per_sec", "step_time", "mfu"} <= records[0].keys()
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert final["loss"] == records[-1]["loss"]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20, 30]
    assert list((tmp_path / "tensorboard").iterdir())


def test_rerunning_resumes_where_the_run_stopped(tmp_path):
    batches = make_batches(40)
    whole = tmp_path / "whole"
    expected = train(loop_config(train_steps=20), whole, train_iterator=grain_iterator(batches), progress=False)
    split = tmp_path / "split"
    train(loop_config(train_steps=10), split, train_iterator=grain_iterator(batches), progress=False)
    resumed = train(loop_config(train_steps=20), split, train_iterator=grain_iterator(batches), progress=False)
    assert resumed["loss"] == expected["loss"]
    assert [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()] == [10, 20]


def test_a_plain_iterator_trains_and_restarts_from_its_beginning_on_resume(tmp_path, capsys):
    batches = make_batches(20)
    train(loop_config(train_steps=10), tmp_path / "plain", train_iterator=iter(batches), progress=False)
    resumed = train(loop_config(train_steps=20), tmp_path / "plain", train_iterator=iter(batches), progress=False)
    assert "a resumed run starts it again from its beginning" in capsys.readouterr().out
    expected = train(loop_config(train_steps=20), tmp_path / "grain", train_iterator=grain_iterator(batches[:10] * 2),
                     progress=False)
    assert resumed["loss"] == expected["loss"]
    # Resumed with a grain iterator, the run has no position to give it: it starts at its beginning.
    regrained = train(loop_config(train_steps=30), tmp_path / "plain", train_iterator=grain_iterator(batches),
                      progress=False)
    assert "holds no data position: the data iterator starts from its beginning" in capsys.readouterr().out
    expected = train(loop_config(train_steps=30), tmp_path / "expected",
                     train_iterator=grain_iterator(batches[:10] * 3), progress=False)
    assert regrained["loss"] == expected["loss"]


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    batches = make_batches(30)
    batches[14]["loss_weights"][:] = np.nan
    with pytest.raises(NonFiniteError, match="loss is nan at step 15"):
        train(loop_config(), tmp_path, train_iterator=grain_iterator(batches), progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10]


def test_a_nan_gradient_stops_the_run_before_its_params_are_saved(tmp_path):
    """Weights of +-3e37 that cancel give step 10 a finite (huge) loss but a NaN gradient, and so NaN
    params after it: they must not replace the good checkpoint."""
    batches = make_batches(30)
    batches[9]["loss_weights"][1, :2] = [3e37, -3e37]
    with pytest.raises(NonFiniteError, match="grad_norm is nan at step 10"):
        train(loop_config(checkpoint_every=5), tmp_path, train_iterator=grain_iterator(batches), progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5]


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path):
    # The default corpus' BPE has 4096 ids; MODEL has 256.
    with pytest.raises(ValueError, match="'default' was tokenized with 4096 ids .* the model's vocab_size is 256"):
        train(loop_config(mixture="default", train_steps=1, log_every=1), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_compile_only_reports_memory_without_running():
    memory = compile_only(loop_config(mesh_shape={"fsdp": 8}))
    assert memory["total_per_device_bytes"] > memory["argument_size_in_bytes"] > 0


@pytest.mark.slow
def test_compile_only_fits_phi_1_5_on_8_devices():
    """The full 1.42B model, AOT-compiled on a fake 8-device mesh: fp32 params + two Adam moments are
    12 bytes x 1.42B / 8 devices = 2.13 GB per device with FSDP."""
    from phi_jax import phi_1_5

    config = loop_config(model=phi_1_5(dtype="bfloat16", scan_layers=True, remat="full"), batch_size=8,
                         seq_len=2048, mesh_shape={"fsdp": 8})
    memory = compile_only(config)
    assert 2.1e9 < memory["argument_size_in_bytes"] < 2.2e9
    assert memory["total_per_device_bytes"] < 40e9


def test_init_from_starts_from_the_imported_weights(tmp_path):
    from phi_jax import hf
    from phi_jax.model import init_params
    from phi_jax.train_step import weighted_losses

    imported = init_params(MODEL, jax.random.key(42))
    hf.save(MODEL, imported, tmp_path / "hf")
    batches = make_batches(1)
    final = train(loop_config(train_steps=1, log_every=1, init_from=str(tmp_path / "hf")), tmp_path / "run",
                  train_iterator=grain_iterator(batches), progress=False)
    total, sums = weighted_losses(MODEL, imported, batches[0], None, 0.0)
    assert final["loss"] == pytest.approx(float(sums["ce"] / sums["weight"]), rel=1e-5)


def test_init_from_a_different_model_is_refused(tmp_path):
    from phi_jax import hf
    from phi_jax.model import init_params

    other = MODEL.replace(num_layers=1)
    hf.save(other, init_params(other, jax.random.key(0)), tmp_path / "hf")
    with pytest.raises(ValueError, match="differs from the experiment's in \\['num_layers'\\]: num_layers=1 vs 2"):
        train(loop_config(init_from=str(tmp_path / "hf")), tmp_path / "run",
              train_iterator=grain_iterator(make_batches(2)), progress=False)
