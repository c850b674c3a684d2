"""phi_jax.hf against transformers' PhiForCausalLM: logits and greedy parity for all three checkpoint
layouts, sharded / .bin reading, export round trips and dtypes, and every refusal leaving no files.

Every checkpoint is a tiny seeded random model written into tmp_path; no network.
"""

import functools
import io
import json
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from phi_jax import cli, hf
from phi_jax.config import PHI_EOS_ID, PhiConfig
from phi_jax.model import Phi, init_cache, param_shapes

try:
    from tests import hf_fixtures as fx
except ImportError:  # tests/ on sys.path instead of the repository root
    import hf_fixtures as fx

# Partial-rotary bugs hide on short prompts: compare on 520 tokens. Greedy decoding continues the
# first 515 of them, so that it reuses the forward compiled for 520 tokens.
BATCH, LENGTH, DECODE_STEPS = 2, 520, 5
LOGIT_TOL = 1e-4

# Two configs unlike the presets and unlike each other. "a" keeps the defaults the legacy layouts
# cannot express (rope_theta 10000, layer_norm_eps 1e-5) and a vocab that is a multiple of 64.
HF_CONFIGS = {
    "a": dict(vocab_size=1024, hidden_size=64, num_attention_heads=4, intermediate_size=256,
              num_hidden_layers=2, partial_rotary_factor=0.5, max_position_embeddings=1024),
    "b": dict(vocab_size=1000, hidden_size=96, num_attention_heads=3, intermediate_size=200,
              num_hidden_layers=3, partial_rotary_factor=0.25, rope_theta=5000.0, layer_norm_eps=1e-6,
              max_position_embeddings=1024),
}
# Seeds whose reference logits have no near-tie (top-2 gap > 5e-4, 100x the float32 error) for argmax.
SEEDS = {"a": 6, "b": 1}
EXPECTED_CONFIGS = {
    "a": PhiConfig(vocab_size=1024, hidden_size=64, num_heads=4, head_dim=16, intermediate_size=256,
                   num_layers=2, rotary_dim=8, rope_theta=10000.0, max_position_embeddings=1024,
                   layer_norm_eps=1e-5),
    "b": PhiConfig(vocab_size=1000, hidden_size=96, num_heads=3, head_dim=32, intermediate_size=200,
                   num_layers=3, rotary_dim=8, rope_theta=5000.0, max_position_embeddings=1024,
                   layer_norm_eps=1e-6),
}


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens):
    return Phi(config).apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnums=0)
def _forward_cached(config, params, tokens, cache):
    return Phi(config).apply({"params": params}, tokens, cache=cache)


def _greedy_full_forward(config, params, tokens, steps):
    """Greedy continuation of tokens[:, :-steps], by full forwards over a buffer of fixed length.

    Causal attention: the placeholder tokens after the position being predicted cannot change it.
    """
    buffer = np.array(tokens)
    buffer[:, -steps:] = 0
    prompt = buffer.shape[1] - steps
    for s in range(steps):
        logits = _forward(config, params, buffer)
        buffer[:, prompt + s] = np.asarray(jnp.argmax(logits[:, prompt + s - 1], axis=-1))
    return buffer[:, prompt:]


def _greedy_cached(config, params, tokens, steps):
    """Prefill the prompt into a KV cache, then decode one token at a time."""
    cache = init_cache(config, tokens.shape[0], tokens.shape[1] + steps)
    logits, cache = _forward_cached(config, params, jnp.asarray(tokens, jnp.int32), cache)
    new = []
    for _ in range(steps):
        next_ids = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        new.append(next_ids)
        logits, cache = _forward_cached(config, params, next_ids, cache)
    return np.asarray(jnp.concatenate(new, axis=1))


class Checkpoint:
    """A random transformers model saved with save_pretrained, its reference logits, and our load."""

    def __init__(self, name, directory):
        self.name = name
        self.model = fx.make_hf_model(seed=SEEDS[name], **HF_CONFIGS[name])
        self.path = directory / "hf"
        self.model.save_pretrained(self.path)
        self.tokens = np.random.default_rng(SEEDS[name]).integers(
            0, HF_CONFIGS[name]["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
        self.hf_logits = fx.hf_logits(self.model, self.tokens)
        self.state = fx.state_dict_numpy(self.model)
        self.config, self.params = hf.load(self.path)

    @functools.cached_property
    def logits(self):
        return np.asarray(_forward(self.config, self.params, self.tokens))

    @functools.cached_property
    def hf_greedy(self):
        """transformers' greedy continuation of the first LENGTH - DECODE_STEPS tokens."""
        return fx.hf_greedy(self.model, self.tokens[:, :-DECODE_STEPS], DECODE_STEPS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = Checkpoint(name, tmp_path_factory.mktemp(f"ckpt_{name}"))
        return built[name]
    return get


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def ckpt(request, checkpoints):
    return checkpoints(request.param)


@pytest.fixture(scope="module")
def ckpt_a(checkpoints):
    return checkpoints("a")


def _assert_logits_match(ours, reference, tol=LOGIT_TOL):
    assert ours.shape == reference.shape and ours.dtype == np.float32
    # The reference must be informative, or the argmax comparison proves nothing.
    assert reference.std() > 0.1 and len(np.unique(reference.argmax(-1))) > 20
    err = np.abs(ours - reference).max()
    assert err <= tol, f"max |logit difference| {err:.3g} > {tol}"
    mismatches = np.argwhere(ours.argmax(-1) != reference.argmax(-1))
    assert len(mismatches) == 0, f"argmax differs at (batch, position) {mismatches[:5].tolist()}"


def _assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _copy_tree(tree):
    return jax.tree.map(np.array, tree)


# ---------------------------------------------------------------------------------------------
# 1. parity with transformers


def test_config_from_hf_checkpoint(ckpt):
    assert ckpt.config == EXPECTED_CONFIGS[ckpt.name]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(ckpt.params))


def test_logits_match_transformers(ckpt):
    _assert_logits_match(ckpt.logits, ckpt.hf_logits)


def test_greedy_decode_matches_transformers(ckpt):
    ours = _greedy_full_forward(ckpt.config, ckpt.params, ckpt.tokens, DECODE_STEPS)
    np.testing.assert_array_equal(ours, ckpt.hf_greedy)


def test_cached_greedy_decode_matches_transformers(ckpt_a):
    """The same through phi_jax's KV cache (one config only: two more compiles)."""
    ours = _greedy_cached(ckpt_a.config, ckpt_a.params, ckpt_a.tokens[:, :-DECODE_STEPS], DECODE_STEPS)
    np.testing.assert_array_equal(ours, ckpt_a.hf_greedy)


# ---------------------------------------------------------------------------------------------
# 2. legacy layouts


@pytest.mark.parametrize("write", [fx.write_mixformer, fx.write_phi_msft], ids=["mixformer", "phi-msft"])
def test_legacy_layout_matches_transformers(ckpt_a, tmp_path, write):
    path = write(ckpt_a.model, tmp_path / "legacy")
    fields = json.loads((path / "config.json").read_text())
    assert fields["model_type"] in ("mixformer-sequential", "phi-msft")
    config, params = hf.load(path)
    assert config == ckpt_a.config
    _assert_trees_equal(params, ckpt_a.params)
    _assert_logits_match(np.asarray(_forward(config, params, ckpt_a.tokens)), ckpt_a.hf_logits)


def test_mixformer_checkpoint_has_the_ignored_buffer(ckpt_a, tmp_path):
    """The rotary inv_freq buffers are in the file (so the load above really ignored them)."""
    path = fx.write_mixformer(ckpt_a.model, tmp_path / "mixformer")
    names = safetensors.numpy.load_file(path / "model.safetensors")
    assert "layers.1.mixer.rotary_emb.inv_freq" in names and "layers.0.wte.weight" in names
    assert "layers.3.linear.weight" in names and "layers.3.ln.bias" in names


def test_legacy_config_pads_vocab_and_defaults_n_inner():
    fields = {"model_type": "phi-msft", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_inner": None,
              "rotary_dim": 8, "n_positions": 256, "layer_norm_epsilon": 1e-6, "vocab_size": 1000,
              "activation_function": "gelu_new", "n_head_kv": None}
    config, layout = hf.config_from_hf(fields)
    assert layout == "phi-msft"
    assert (config.vocab_size, config.intermediate_size, config.rotary_dim, config.layer_norm_eps,
            config.max_position_embeddings) == (1024, 256, 8, 1e-6, 256)
    with pytest.raises(hf.HFCheckpointError, match="n_head_kv=2"):
        hf.config_from_hf({**fields, "n_head_kv": 2})


# ---------------------------------------------------------------------------------------------
# 3. sharded safetensors, pytorch_model.bin


def test_sharded_safetensors_round_trip(ckpt_a, tmp_path):
    out = tmp_path / "sharded"
    max_shard_bytes = 300_000
    hf.save(ckpt_a.config, ckpt_a.params, out, max_shard_bytes=max_shard_bytes)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(ckpt_a.state)
    total = 0
    for shard in shards:
        tensors = safetensors.numpy.load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in tensors)
        nbytes = sum(t.nbytes for t in tensors.values())
        assert nbytes <= max_shard_bytes or len(tensors) == 1
        total += nbytes
    assert index["metadata"]["total_size"] == total

    config, params = hf.load(out)
    assert config == ckpt_a.config
    _assert_trees_equal(params, ckpt_a.params)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for name, tensor in fx.state_dict_numpy(reloaded).items():
        np.testing.assert_array_equal(tensor, ckpt_a.state[name], err_msg=name)
    np.testing.assert_allclose(fx.hf_logits(reloaded, ckpt_a.tokens), ckpt_a.hf_logits, rtol=0, atol=1e-5)


def test_default_shard_size_is_what_the_cli_calls_2GB():
    assert hf.DEFAULT_MAX_SHARD_BYTES == cli.parse_size("2GB") == 2 * 10**9


def test_pytorch_bin_single_sharded_and_bfloat16(ckpt_a, tmp_path):
    config_json = (ckpt_a.path / "config.json").read_text()
    state = ckpt_a.model.state_dict()

    single = tmp_path / "bin"
    single.mkdir()
    (single / "config.json").write_text(config_json)
    torch.save(state, single / "pytorch_model.bin")
    _assert_trees_equal(hf.load(single)[1], ckpt_a.params)

    sharded = tmp_path / "bin_sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(config_json)
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_trees_equal(hf.load(sharded)[1], ckpt_a.params)

    bf16 = tmp_path / "bin_bf16"
    bf16.mkdir()
    (bf16 / "config.json").write_text(config_json)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, bf16 / "pytorch_model.bin")
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), ckpt_a.params)
    _, params = hf.load(bf16)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    _assert_trees_equal(params, rounded)


def test_pytorch_bin_without_torch_says_how_to_convert(ckpt_a, tmp_path, monkeypatch):
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text((ckpt_a.path / "config.json").read_text())
    torch.save(ckpt_a.model.state_dict(), path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(hf.HFCheckpointError) as info:
        hf.load(path)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "torch" in message
    assert "convert" in message and "safetensors" in message and "save_file" in message


# ---------------------------------------------------------------------------------------------
# 4. export


def test_import_export_transformers_round_trip(ckpt, tmp_path):
    out = tmp_path / "export"
    hf.save(ckpt.config, ckpt.params, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert set(fx.safetensors_dtypes(out / "model.safetensors").values()) == {"F32"}
    fields = json.loads((out / "config.json").read_text())
    assert fields["torch_dtype"] == "float32" and fields["eos_token_id"] is None  # vocab < 50257

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded, transformers.PhiForCausalLM) and reloaded.dtype == torch.float32
    for name, tensor in fx.state_dict_numpy(reloaded).items():
        np.testing.assert_array_equal(tensor, ckpt.state[name], err_msg=name)
    np.testing.assert_allclose(fx.hf_logits(reloaded, ckpt.tokens), ckpt.hf_logits, rtol=0, atol=1e-5)
    # ... and our own loader reads back what we wrote.
    config, params = hf.load(out)
    assert config == ckpt.config
    _assert_trees_equal(params, ckpt.params)


@pytest.mark.parametrize("dtype,header,torch_dtype,np_dtype", [
    ("bfloat16", "BF16", torch.bfloat16, ml_dtypes.bfloat16),
    ("float16", "F16", torch.float16, np.float16),
])
def test_export_half_precision(ckpt_a, tmp_path, dtype, header, torch_dtype, np_dtype):
    out = tmp_path / dtype
    hf.save(ckpt_a.config, ckpt_a.params, out, dtype=dtype)
    assert set(fx.safetensors_dtypes(out / "model.safetensors").values()) == {header}
    fields = json.loads((out / "config.json").read_text())
    assert fields["torch_dtype"] == dtype

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch_dtype
    for name, tensor in reloaded.state_dict().items():
        expected = torch.as_tensor(ckpt_a.state[name]).to(torch_dtype)
        assert tensor.dtype == torch_dtype and torch.equal(tensor, expected), name
    logits = fx.hf_logits(reloaded, ckpt_a.tokens[:, :64])
    assert np.isfinite(logits).all()
    assert np.abs(logits - ckpt_a.hf_logits[:, :64]).max() < 0.25

    rounded = jax.tree.map(lambda x: np.asarray(x).astype(np_dtype).astype(np.float32), ckpt_a.params)
    _assert_trees_equal(hf.load(out)[1], rounded)


def test_export_scanned_equals_unscanned(ckpt_a, tmp_path):
    config, params = hf.load(ckpt_a.path, scan_layers=True)
    assert config == ckpt_a.config.replace(scan_layers=True)
    assert "layers" in params and params["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 64, 256)
    hf.save(config, params, tmp_path / "scanned")
    hf.save(ckpt_a.config, ckpt_a.params, tmp_path / "unscanned")
    files = fx.listing(tmp_path / "unscanned")
    assert fx.listing(tmp_path / "scanned") == files == ["config.json", "model.safetensors"]
    for name in files:
        assert (tmp_path / "scanned" / name).read_bytes() == (tmp_path / "unscanned" / name).read_bytes(), name


def test_export_phi_vocabulary_writes_eos(tmp_path):
    config = PhiConfig(vocab_size=50304, hidden_size=8, num_heads=2, head_dim=4, rotary_dim=2,
                       intermediate_size=16, num_layers=1, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), param_shapes(config))
    hf.save(config, params, tmp_path / "out")
    fields = json.loads((tmp_path / "out" / "config.json").read_text())
    assert fields["eos_token_id"] == PHI_EOS_ID == 50256 and fields["bos_token_id"] == 50256
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert loaded.eos_token_id == 50256 and loaded.vocab_size == 50304


# ---------------------------------------------------------------------------------------------
# 5. refusals: each names what is wrong and leaves no files behind


def _drop(key):
    def corrupt(state, fields):
        del state[key]
    return corrupt


def _put(key, shape):
    def corrupt(state, fields):
        state[key] = np.zeros(shape, np.float32)
    return corrupt


def _set_field(**changes):
    def corrupt(state, fields):
        fields.update(changes)
    return corrupt


BAD_CHECKPOINTS = {
    "missing_key": (_drop("model.layers.1.mlp.fc2.bias"), ["model.layers.1.mlp.fc2.bias", "(64,)", "missing"]),
    "extra_key": (_put("model.layers.0.self_attn.rotary.scale", (3,)),
                  ["model.layers.0.self_attn.rotary.scale", "(3,)", "unexpected"]),
    "wrong_shape": (_put("model.layers.0.mlp.fc1.weight", (255, 64)),
                    ["model.layers.0.mlp.fc1.weight", "(255, 64)", "(256, 64)"]),
    "lm_head_vocab": (_put("lm_head.bias", (1000,)), ["lm_head.bias", "(1000,)", "(1024,)"]),
    "unknown_model_type": (_set_field(model_type="llama"), ["llama", "mixformer-sequential", "config.json"]),
    "unsupported_activation": (_set_field(hidden_act="relu"), ["relu", "activation", "config.json"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_load_rejects_bad_checkpoint(ckpt_a, tmp_path, case):
    corrupt, expected = BAD_CHECKPOINTS[case]
    state, fields = dict(ckpt_a.state), json.loads((ckpt_a.path / "config.json").read_text())
    corrupt(state, fields)
    path = fx.write_checkpoint(tmp_path / "bad", fields, state)
    before = fx.listing(tmp_path)
    with pytest.raises(hf.HFCheckpointError) as info:
        hf.load(path)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert str(path) in message
    assert fx.listing(tmp_path) == before


def test_load_rejects_wrong_legacy_shape(ckpt_a, tmp_path):
    path = fx.write_phi_msft(ckpt_a.model, tmp_path / "msft")
    state = safetensors.numpy.load_file(path / "model.safetensors")
    state["transformer.h.1.mixer.Wqkv.weight"] = state["transformer.h.1.mixer.Wqkv.weight"][:128]
    safetensors.numpy.save_file(state, path / "model.safetensors")
    with pytest.raises(hf.HFCheckpointError, match=r"transformer\.h\.1\.mixer\.Wqkv\.weight.*\(128, 64\).*\(192, 64\)"):
        hf.load(path)


def test_load_rejects_missing_files(ckpt_a, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((ckpt_a.path / "model.safetensors").read_bytes())
    with pytest.raises(hf.HFCheckpointError, match="config.json") as info:
        hf.load(no_config)
    assert str(no_config) in str(info.value)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((ckpt_a.path / "config.json").read_text())
    with pytest.raises(hf.HFCheckpointError, match="no weights found") as info:
        hf.load(no_weights)
    assert str(no_weights) in str(info.value) and "model.safetensors" in str(info.value)

    missing_shard = tmp_path / "missing_shard"
    missing_shard.mkdir()
    (missing_shard / "config.json").write_text((ckpt_a.path / "config.json").read_text())
    weight_map = {k: "model-00001-of-00001.safetensors" for k in ckpt_a.state}
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(hf.HFCheckpointError, match="model-00001-of-00001.safetensors"):
        hf.load(missing_shard)

    before = fx.listing(tmp_path)
    assert before == sorted(["no_config", "no_config/model.safetensors", "no_weights", "no_weights/config.json",
                             "missing_shard", "missing_shard/config.json",
                             "missing_shard/model.safetensors.index.json"])


def _torch_saved_bytes():
    buffer = io.BytesIO()
    torch.save({"lm_head.bias": torch.zeros(4)}, buffer)
    return buffer.getvalue()


# case -> (file, its contents given the good checkpoint directory, what the error says)
CORRUPT_FILES = {
    "config_not_json": ("config.json", lambda good: b'{"model_type": "phi",\n}', "not valid JSON"),
    "config_not_object": ("config.json", lambda good: b"[]", "JSON list"),
    "safetensors_truncated": ("model.safetensors", lambda good: (good / "model.safetensors").read_bytes()[:100],
                              "not a readable safetensors file"),
    "bin_truncated": ("pytorch_model.bin", lambda good: _torch_saved_bytes()[:100],
                      "not a readable PyTorch checkpoint"),
    "index_not_json": ("model.safetensors.index.json", lambda good: b'{"weight_map": ', "not valid JSON"),
    "index_shard_not_a_name": ("model.safetensors.index.json",
                               lambda good: json.dumps({"weight_map": {"lm_head.bias": 1}}).encode(),
                               "shard file name"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_FILES))
def test_load_rejects_corrupt_files(ckpt_a, tmp_path, capsys, case):
    """A file that does not parse is named, with what it should hold; the CLI says so in one line."""
    file_name, contents, expected = CORRUPT_FILES[case]
    path = tmp_path / "bad"
    path.mkdir()
    (path / "config.json").write_text((ckpt_a.path / "config.json").read_text())
    (path / file_name).write_bytes(contents(ckpt_a.path))
    with pytest.raises(hf.HFCheckpointError, match=expected) as info:
        hf.load(path)
    assert str(path / file_name) in str(info.value)
    assert cli.main(["import-hf", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phi-jax import-hf: error: {path / file_name}: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _wrong_shape(params):
    params["layers_0"]["mlp"]["fc1"]["kernel"] = np.zeros((64, 255), np.float32)
    return ["layers_0", "fc1", "kernel", "(64, 255)", "(64, 256)"]


def _missing(params):
    del params["lm_head"]["bias"]
    return ["lm_head", "bias", "missing", "(1024,)"]


def _extra(params):
    params["layers_1"]["mlp"]["fc3"] = {"kernel": np.zeros((4, 4), np.float32)}
    return ["fc3", "unexpected"]


BAD_PARAMS = {"wrong_shape": _wrong_shape, "missing": _missing, "extra": _extra}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_save_rejects_bad_params(ckpt_a, tmp_path, case):
    params = _copy_tree(ckpt_a.params)
    expected = BAD_PARAMS[case](params)
    with pytest.raises(hf.HFCheckpointError) as info:
        hf.save(ckpt_a.config, params, tmp_path / "out")
    for part in expected:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"
    assert fx.listing(tmp_path) == []


def test_save_rejects_params_not_laid_out_for_the_config(ckpt_a, tmp_path):
    with pytest.raises(hf.HFCheckpointError, match="scan_layers=True"):
        hf.save(ckpt_a.config.replace(scan_layers=True), ckpt_a.params, tmp_path / "out")
    with pytest.raises(ValueError, match="int8"):
        hf.save(ckpt_a.config, ckpt_a.params, tmp_path / "out", dtype="int8")
    assert fx.listing(tmp_path) == []


def test_save_into_existing_directory(ckpt_a, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("original")
    with pytest.raises(FileExistsError, match="out"):
        hf.save(ckpt_a.config, ckpt_a.params, out)
    assert fx.listing(tmp_path) == ["out", "out/keep.txt"]
    assert (out / "keep.txt").read_text() == "original"

    hf.save(ckpt_a.config, ckpt_a.params, out, overwrite=True)
    assert fx.listing(tmp_path) == ["out", "out/config.json", "out/model.safetensors"]
    _assert_trees_equal(hf.load(out)[1], ckpt_a.params)


def _fail_on_second_write(monkeypatch):
    real_save_file, calls = safetensors.numpy.save_file, []

    def save_file(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full (simulated)")
        return real_save_file(*args, **kwargs)
    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    return calls


def test_failure_while_writing_leaves_no_directory(ckpt_a, tmp_path, monkeypatch):
    calls = _fail_on_second_write(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save(ckpt_a.config, ckpt_a.params, tmp_path / "out", max_shard_bytes=300_000)
    assert len(calls) == 2  # the first shard was written before the failure
    assert fx.listing(tmp_path) == []


def test_failure_while_overwriting_keeps_the_original(ckpt_a, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("original")
    _fail_on_second_write(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save(ckpt_a.config, ckpt_a.params, out, max_shard_bytes=300_000, overwrite=True)
    assert fx.listing(tmp_path) == ["out", "out/keep.txt"]
    assert (out / "keep.txt").read_text() == "original"
