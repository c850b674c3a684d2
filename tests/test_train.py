"""Sharded training: the same losses on any mesh, exact gradient accumulation, a loss in sequence chunks
exact to whole logits, the loop's contract."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import tiny
from phi_jax.model import Phi, init_params
from phi_jax.optimizer import OptimizerConfig
from phi_jax.sharding import global_batch, local_batch_rows, make_mesh, mesh_context
from phi_jax.train_step import (
    DEFAULT_LOSS_CHUNK_SIZE,
    abstract_state,
    init_state,
    jit_train_step,
    param_shardings,
    weighted_losses,
)
from phi_jax.trainer import NonFiniteError, TrainConfig, abstract_batch, compile_only, train

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


def run_steps(mesh_shape, batches, devices=None, microbatches=1, model=MODEL, loss_chunk_size=DEFAULT_LOSS_CHUNK_SIZE):
    mesh = make_mesh(mesh_shape, devices)
    with mesh_context(mesh):
        state = init_state(model, OPTIMIZER, mesh, seed=0)
        step = jit_train_step(model, OPTIMIZER, mesh, microbatches=microbatches, loss_chunk_size=loss_chunk_size)
        losses = []
        for batch in batches:
            state, metrics = step(state, global_batch(mesh, batch, len(batch["tokens"])))
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps({"data": 1}, make_batches(3), devices=jax.devices()[:1])


@pytest.mark.core
@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_every_mesh_gives_the_single_device_losses(single_device_run, mesh_shape, capfd):
    assert jax.device_count() == 8
    losses, params = run_steps(mesh_shape, make_batches(3))
    # XLA's partitioner logs when a sharding change can only be done by replicating the whole array.
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    expected_losses, expected_params = single_device_run
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    # Adam moves a parameter by up to lr a step however small its gradient, so summation-order rounding
    # in a near-zero gradient moves it by a fraction of lr (2.1e-5 at most with jax 0.10.2; with 0.11.2
    # one entry 4.4e-5 off in the embedding, one 3.4e-5 in a layer's fc2, under 2.3e-5 elsewhere): allow 2%.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.02 * OPTIMIZER.learning_rate),
                 params, expected_params)


def assert_grads_close(grads, expected):
    """Gradients near zero differ in summation order only: under 1e-6 of each leaf's largest entry,
    as much as jit and eager differ on the whole-logits loss itself."""
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
                 grads, expected)


@pytest.mark.core
def test_the_loss_in_sequence_chunks_gives_the_single_device_gradients_on_a_sharded_mesh(capfd):
    """Gradients, not params after training: Adam magnifies rounding on near-zero gradients."""
    batch, params = make_batches(1)[0], init_params(MODEL, jax.random.key(0))

    def loss_and_grads(mesh):
        with mesh_context(mesh):
            grad_fn = jax.value_and_grad(lambda p, b: weighted_losses(MODEL, p, b, None, 1e-2, loss_chunk_size=12)[0])
            return jax.device_get(jax.jit(grad_fn)(jax.device_put(params, param_shardings(MODEL, mesh)),
                                                   global_batch(mesh, batch, BATCH)))

    # 12 does not divide SEQ: the last chunk is padded, on every shard.
    expected_loss, expected_grads = loss_and_grads(make_mesh({"data": 1}, jax.devices()[:1]))
    loss, grads = loss_and_grads(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert_grads_close(grads, expected_grads)


def whole_logits_losses(config, params, batch, z_loss):
    """The loss from the model's [B, T, V] logits at once: the reference for the chunked one."""
    logits_BxTxV = Phi(config).apply({"params": params}, batch["tokens"], positions_BxT=batch["positions"],
                                     segment_ids_BxT=batch["segment_ids"])
    log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
    weights_BxT = batch["loss_weights"]
    ce = (weights_BxT * (log_z_BxT - target_logit_BxT)).sum()
    z = z_loss * (weights_BxT * log_z_BxT**2).sum()
    return ce + z, {"ce": ce, "z": z, "weight": weights_BxT.sum()}


@pytest.mark.core
@pytest.mark.parametrize("chunk", [16, 7, 40, 1000])
def test_the_loss_in_sequence_chunks_and_its_gradients_equal_the_whole_logits_ones(chunk):
    """T = 40: chunks of 16 and 7 leave a padded last chunk, 40 is one chunk, 1000 is clamped to T.
    Uneven weights (and zeros) would show a padded position counted or a target misaligned."""
    batch = {k: v[:2, :40] for k, v in make_batches(1, seq=40)[0].items()}
    batch["loss_weights"] = np.random.RandomState(1).uniform(0, 2, (2, 40)).astype(np.float32)
    batch["loss_weights"][1, 30:] = 0.0
    params = init_params(MODEL, jax.random.key(0))
    z_loss = 1e-2
    chunked = jax.value_and_grad(lambda p: weighted_losses(MODEL, p, batch, None, z_loss, loss_chunk_size=chunk),
                                 has_aux=True)
    whole = jax.value_and_grad(lambda p: whole_logits_losses(MODEL, p, batch, z_loss), has_aux=True)
    (total, sums), grads = jax.jit(chunked)(params)
    (expected_total, expected_sums), expected_grads = jax.jit(whole)(params)
    assert float(sums["z"]) > 0
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), sums, expected_sums)
    assert_grads_close(grads, expected_grads)


def largest_array_elements(hlo_text):
    return max(math.prod(int(d) for d in dims.split(",") if d)
               for dims in re.findall(r"\b(?:f32|bf16|f16|s32|u32|pred)\[([\d,]*)\]", hlo_text))


@pytest.mark.core
@pytest.mark.parametrize("chunk, whole_logits_exist", [(16, False), (40, True)])
def test_the_compiled_train_step_holds_no_whole_batch_logits(chunk, whole_logits_exist):
    """Vocabulary large next to everything else, so that only logits (or their gradient, or a stack
    of every chunk's) reach B x T x V elements; a chunk of the whole T must find them."""
    model = tiny(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, head_dim=16,
                 rotary_dim=8)
    config = loop_config(model=model, batch_size=2, seq_len=40, loss_chunk_size=chunk)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    with mesh_context(mesh):
        traced = jit_train_step(model, OPTIMIZER, mesh, loss_chunk_size=chunk).trace(
            abstract_state(model, OPTIMIZER, mesh), abstract_batch(config, mesh))
        hlo = traced.lower().compile().as_text()
    whole_logits = config.batch_size * config.seq_len * model.vocab_size
    assert (largest_array_elements(hlo) >= whole_logits) == whole_logits_exist


@pytest.mark.core
def test_a_non_positive_loss_chunk_size_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="TrainConfig.loss_chunk_size: .* found 0"):
        loop_config(loss_chunk_size=0)
    batch = make_batches(1)[0]
    with pytest.raises(ValueError, match="loss_chunk_size must be a positive .* found -4"):
        weighted_losses(MODEL, init_params(MODEL, jax.random.key(0)), batch, None, 0.0, loss_chunk_size=-4)


@pytest.mark.core
def test_parameters_are_sharded_as_the_rules_say():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with mesh_context(mesh):
        state = init_state(MODEL, OPTIMIZER, mesh, seed=0)
    assert tuple(state.params["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec) == ("fsdp", "tensor")
    assert tuple(state.params["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec) == ("fsdp", "tensor", None)
    adam_mu = state.opt_state[1][0].mu
    assert tuple(adam_mu["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec) == ("fsdp", "tensor")


@pytest.mark.core
def test_gradient_accumulation_equals_one_big_batch(single_device_run):
    losses, params = run_steps({"data": 1}, make_batches(3), devices=jax.devices()[:1], microbatches=4)
    expected_losses, expected_params = single_device_run
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, expected_params)


@pytest.mark.core
@pytest.mark.parametrize("shape, message", [
    ({"data": 3}, "needs 3 devices, found 8"),
    ({"data": -1, "fsdp": 3}, "not divisible by 3"),
    ({"batch": 8}, "unknown axes \\['batch'\\]"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
])
def test_bad_mesh_shapes_say_what_they_found(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)


@pytest.mark.core
def test_each_process_feeds_its_rows():
    assert local_batch_rows(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), 16) == (0, 16)


def grain_iterator(batches):
    import grain  # the data edge: not on the GPU machines, so not imported by the core tests (-m core)

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


def test_a_plain_iterator_trains_and_restarts_from_its_beginning_on_resume(tmp_path, caplog):
    batches = make_batches(20)
    train(loop_config(train_steps=10), tmp_path / "plain", train_iterator=iter(batches), progress=False)
    resumed = train(loop_config(train_steps=20), tmp_path / "plain", train_iterator=iter(batches), progress=False)
    assert "a resumed run starts it again from its beginning" in caplog.text
    expected = train(loop_config(train_steps=20), tmp_path / "grain", train_iterator=grain_iterator(batches[:10] * 2),
                     progress=False)
    assert resumed["loss"] == expected["loss"]
    # Resumed with a grain iterator, the run has no position to give it: it starts at its beginning.
    regrained = train(loop_config(train_steps=30), tmp_path / "plain", train_iterator=grain_iterator(batches),
                      progress=False)
    assert "holds no data position: the data iterator starts from its beginning" in caplog.text
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


@pytest.mark.core
def test_compile_only_reports_memory_without_running():
    memory = compile_only(loop_config(mesh_shape={"fsdp": 8}))
    assert memory["total_per_device_bytes"] > memory["argument_size_in_bytes"] > 0


@pytest.mark.core
@pytest.mark.slow
def test_compile_only_fits_phi_1_5_on_8_devices():
    """The full 1.42B model, AOT-compiled on a fake 8-device mesh: fp32 params + two Adam moments are
    12 bytes x 1.42B / 8 devices = 2.13 GB per device with FSDP. The whole is 7.30e9 bytes here
    (jax 0.10.2, one row per device, the loss in chunks of 512)."""
    from phi_jax import phi_1_5

    config = loop_config(model=phi_1_5(dtype="bfloat16", scan_layers=True, remat="full"), batch_size=8,
                         seq_len=2048, mesh_shape={"fsdp": 8})
    memory = compile_only(config)
    assert 2.1e9 < memory["argument_size_in_bytes"] < 2.2e9
    assert memory["total_per_device_bytes"] < 9e9


def test_init_from_starts_from_the_imported_weights(tmp_path):
    from phi_jax import hf

    imported = init_params(MODEL, jax.random.key(42))
    hf.save(MODEL, imported, tmp_path / "hf")
    batches = make_batches(1)
    final = train(loop_config(train_steps=1, log_every=1, init_from=str(tmp_path / "hf")), tmp_path / "run",
                  train_iterator=grain_iterator(batches), progress=False)
    total, sums = weighted_losses(MODEL, imported, batches[0], None, 0.0)
    assert final["loss"] == pytest.approx(float(sums["ce"] / sums["weight"]), rel=1e-5)


def test_init_from_a_different_model_is_refused(tmp_path):
    from phi_jax import hf

    other = MODEL.replace(num_layers=1)
    hf.save(other, init_params(other, jax.random.key(0)), tmp_path / "hf")
    with pytest.raises(ValueError, match="differs from the experiment's in \\['num_layers'\\]: num_layers=1 vs 2"):
        train(loop_config(init_from=str(tmp_path / "hf")), tmp_path / "run",
              train_iterator=grain_iterator(make_batches(2)), progress=False)


@pytest.mark.core
def test_a_fused_attention_model_initializes_on_a_mesh_that_splits_the_batch():
    """The params are traced on one row; a fused kernel under a data x fsdp mesh runs per batch shard,
    so tracing it there failed ('not evenly divisible'), as every multi-device GPU or TPU run would."""
    model = MODEL.replace(attention_impl="pallas_gpu", attention_interpret=True)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with mesh_context(mesh):
        state = init_state(model, OPTIMIZER, mesh, seed=0)
    expected = init_params(MODEL, jax.random.split(jax.random.key(0))[0])  # init_state's init rng
    # jit under out_shardings rounds the normal sampler's last bit differently from eager init.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                 jax.device_get(state.params), expected)
