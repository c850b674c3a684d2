"""The model on its own: layouts, caching, packing, dropout, partitioning metadata."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import Phi, PhiConfig, init_cache, phi_1, phi_1_5, tiny
from phi_jax.generate import generate
from phi_jax.model import Embedding, init_params, param_shapes, positions_from_segments, stack_layers, unstack_layers

pytestmark = pytest.mark.core  # the JAX stack only: also run under the newest jax (.ci/newest_jax.sh)

CONFIG = tiny(vocab_size=320, hidden_size=64, intermediate_size=128, num_heads=4, head_dim=16, rotary_dim=8,
              num_layers=3)


@functools.partial(jax.jit, static_argnames=("config", "deterministic"))
def forward(config, params, tokens, deterministic=True, **inputs):
    """Jitted, because op-by-op Flax on CPU costs more in dispatch than the math."""
    return Phi(config).apply({"params": params}, tokens, deterministic=deterministic, **inputs)


@pytest.fixture(scope="module")
@jax.jit
def params():
    # Non-zero biases and LayerNorm params, so that a misplaced bias cannot hide.
    base = init_params(CONFIG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(base)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def random_tokens(seed, shape, vocab=CONFIG.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_logits_are_float32_with_bfloat16_compute(params):
    tokens = random_tokens(2, (2, 24))
    full = forward(CONFIG, params, tokens)
    half = forward(CONFIG.replace(dtype="bfloat16"), params, tokens)
    assert full.shape == half.shape == (2, 24, CONFIG.vocab_size)
    assert half.dtype == jnp.float32
    assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.float32, params))
    np.testing.assert_allclose(half, full, atol=0.1)


def test_bfloat16_embedding_gradient_sums_each_rows_cotangents_in_float32():
    """The gradient of a table row sums a cotangent per position of its token: 4096 positions of a
    few tokens, so summed in bfloat16 the frequent rows would be far off."""
    config = CONFIG.replace(dtype="bfloat16")
    tokens = jax.random.choice(jax.random.key(4), 3, (8, 512), p=jnp.array([0.9, 0.09, 0.01]))
    d_rows = jax.random.normal(jax.random.key(5), (8, 512, config.hidden_size)).astype(jnp.bfloat16)
    embed = Embedding(config)
    table = embed.init(jax.random.key(6), tokens)

    def loss(table):
        return jnp.sum(embed.apply(table, tokens).astype(jnp.float32) * d_rows.astype(jnp.float32))

    d_table = np.asarray(jax.jit(jax.grad(loss))(table)["params"]["embedding"].unbox(), np.float64)
    exact = np.zeros_like(d_table)
    np.add.at(exact, np.asarray(tokens), np.asarray(d_rows.astype(jnp.float32), np.float64))
    # One rounding to bfloat16 of each exact sum: within 2**-8 of the row's largest entry.
    row_scale = np.abs(exact).max(axis=1, keepdims=True)
    assert np.all(np.abs(d_table - exact) <= 2**-8 * row_scale)
    assert np.all(d_table[3:] == 0)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_and_unscanned_agree_in_value_and_gradient(params, remat):
    tokens = random_tokens(3, (2, 20))
    scanned_config = CONFIG.replace(scan_layers=True, remat=remat)
    scanned_params = stack_layers(params, CONFIG.num_layers)
    assert jax.tree.map(jnp.shape, scanned_params) == jax.tree.map(jnp.shape, param_shapes(scanned_config))

    def loss(config, p):
        return jnp.mean(jax.nn.log_softmax(Phi(config).apply({"params": p}, tokens))[..., 0])

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    value, grads = value_and_grad(CONFIG, params)
    scanned_value, scanned_grads = value_and_grad(scanned_config, scanned_params)
    np.testing.assert_allclose(scanned_value, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 unstack_layers(scanned_grads, CONFIG.num_layers), grads)


def test_stack_and_unstack_layers_are_inverse(params):
    again = unstack_layers(stack_layers(params, CONFIG.num_layers), CONFIG.num_layers)
    jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_equals_full_forward(params, scan_layers):
    config = CONFIG.replace(scan_layers=scan_layers)
    if scan_layers:
        params = stack_layers(params, CONFIG.num_layers)
    tokens = random_tokens(4, (2, 14))
    full = forward(config, params, tokens)

    cache = init_cache(config, batch_size=2, max_length=20)
    prefill, cache = forward(config, params, tokens[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 14):
        logits, cache = forward(config, params, tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    assert int(cache.index) == 14
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def test_greedy_generate_equals_argmax_of_full_forward(params):
    prompt = random_tokens(5, (2, 6))
    tokens = generate(CONFIG, params, prompt, max_new_tokens=8)
    assert tokens.shape == (2, 14)
    np.testing.assert_array_equal(tokens[:, :6], prompt)
    # Causal: the logits at t - 1 of the whole sequence are those of the prefix tokens[:, :t].
    logits = forward(CONFIG, params, tokens)
    np.testing.assert_array_equal(tokens[:, 6:], jnp.argmax(logits[:, 5:-1], axis=-1))


def test_sampling_is_reproducible_per_seed(params):
    prompt = random_tokens(6, (1, 4))
    def sample(seed):
        return generate(CONFIG, params, prompt, 12, temperature=1.0, rng=jax.random.key(seed))
    np.testing.assert_array_equal(sample(0), sample(0))
    assert not np.array_equal(sample(0), sample(1))


def test_positions_restart_at_each_segment():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(segments), [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]])


def test_packed_segments_get_the_logits_they_get_alone(params):
    first, second = random_tokens(7, (1, 9)), random_tokens(8, (1, 6))
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.array([[1] * 9 + [2] * 6])
    logits = forward(CONFIG, params, packed, segment_ids_BxT=segment_ids)
    np.testing.assert_allclose(logits[:, :9], forward(CONFIG, params, first), atol=2e-5)
    np.testing.assert_allclose(logits[:, 9:], forward(CONFIG, params, second), atol=2e-5)
    explicit_positions = jnp.array([list(range(9)) + list(range(6))])
    np.testing.assert_array_equal(
        forward(CONFIG, params, packed, segment_ids_BxT=segment_ids, positions_BxT=explicit_positions), logits)
    # Without segment ids the second document sees the first one.
    unpacked = forward(CONFIG, params, packed)
    assert np.abs(unpacked[:, 9:] - logits[:, 9:]).max() > 1e-3


def test_dropout_runs_only_when_asked(params):
    config = CONFIG.replace(embed_dropout=0.1, attention_dropout=0.1, residual_dropout=0.1)
    tokens = random_tokens(9, (2, 12))
    evaluation = forward(config, params, tokens)
    np.testing.assert_allclose(evaluation, forward(CONFIG, params, tokens), atol=1e-6)
    train = jax.jit(lambda seed: Phi(config).apply({"params": params}, tokens, deterministic=False,
                                                  rngs={"dropout": jax.random.key(seed)}))
    np.testing.assert_array_equal(train(0), train(0))
    assert np.abs(train(0) - train(1)).max() > 1e-3
    assert np.abs(train(0) - evaluation).max() > 1e-3


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axis_names(scan_layers):
    config = CONFIG.replace(scan_layers=scan_layers)
    boxed = jax.eval_shape(Phi(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    specs = nn.get_partition_spec(boxed)
    known = {"vocab", "embed", "heads", "kv", "mlp", "norm", "layers"}
    leaves = jax.tree.leaves(nn.meta.unbox(boxed))
    for (path, spec), leaf in zip(jax.tree_util.tree_flatten_with_path(specs)[0], leaves):
        assert len(spec) == leaf.ndim, jax.tree_util.keystr(path)
        assert set(spec) <= known, jax.tree_util.keystr(path)
        assert (spec[0] == "layers") == scan_layers or not jax.tree_util.keystr(path).startswith("['layers"), path


@pytest.mark.parametrize("preset, expected", [(phi_1_5, 1_418_270_720), (phi_1, 1_418_270_720)])
def test_presets_have_the_published_parameter_count(preset, expected):
    config = preset()
    assert config.num_params == expected
    assert sum(x.size for x in jax.tree.leaves(param_shapes(config.replace(num_layers=1)))) == \
        config.replace(num_layers=1).num_params
    assert (config.rotary_dim, config.head_dim, config.vocab_size) == (32, 64, 51200)


def test_phi_1_trains_with_dropout():
    assert phi_1().attention_dropout == phi_1().residual_dropout == 0.1
    assert phi_1_5().attention_dropout == 0.0


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=3), "num_heads \\* head_dim"),
    (dict(rotary_dim=33), "rotary_dim"),
    (dict(remat="some"), "remat"),
])
def test_bad_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_config_json_round_trip_and_unknown_field():
    config = tiny(scan_layers=True, dtype="bfloat16")
    assert PhiConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown PhiConfig fields \\['hiden_size'\\]"):
        PhiConfig.from_json('{"hiden_size": 3}', source="x.json")
