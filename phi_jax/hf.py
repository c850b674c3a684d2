"""Hugging Face checkpoints <-> phi_jax params.

`load(path)` reads config.json and the weights (one or sharded safetensors, or pytorch_model.bin
through torch's weights-only loader) in any of the three layouts phi checkpoints have shipped in:

    layout      config model_type       weight names
    hf          phi                     model.layers.{i}.self_attn.q_proj.weight, ...
    mixformer   mixformer-sequential    layers.{i+1}.mixer.Wqkv.weight, ... (embedding is layers.0)
    phi-msft    phi-msft                transformer.h.{i}.mixer.Wqkv.weight, ...

Every layout is first renamed into the `hf` layout (fused Wqkv rows split into q, k, v thirds), and
one table maps `hf` names onto the params tree. `save` writes the `hf` layout, which
`transformers.AutoModelForCausalLM.from_pretrained` loads. Everything is checked (keys, shapes)
before anything is written.
"""

import json
import math
import pathlib
import pickle
import re

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

from phi_jax.config import PHI_BASE_VOCAB, PHI_EOS_ID, PhiConfig
from phi_jax.errors import PhiJaxError
from phi_jax.files import atomic_directory
from phi_jax.model import param_shapes, stack_layers, unstack_layers

LAYOUTS = {"phi": "hf", "mixformer-sequential": "mixformer", "phi-msft": "phi-msft"}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # "2GB" as transformers and `export-hf --max_shard_size` read it
# Buffers the original remote code stored beside the weights; recomputed, never loaded.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFCheckpointError(PhiJaxError, ValueError):
    """A Hugging Face checkpoint that cannot be read (a missing or unparsable file, an unsupported
    config) or that does not match what its config (or our model) says it holds."""


# ---------------------------------------------------------------------------------------------
# config.json <-> PhiConfig


def _require(fields: dict, source, key, expected, found_ok):
    value = fields.get(key, expected)
    if not found_ok(value):
        raise HFCheckpointError(f"{source}: {key}={value!r} is not supported; expected {expected!r}")
    return value


def config_from_hf(fields: dict, source="config.json") -> tuple[PhiConfig, str]:
    """(PhiConfig, layout) from the fields of a config.json in any of the three layouts."""
    model_type = fields.get("model_type")
    if model_type not in LAYOUTS:
        raise HFCheckpointError(
            f"{source}: unknown layout, model_type={model_type!r}; expected one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[model_type]
    read_fields = _transformers_fields if layout == "hf" else _remote_code_fields
    try:
        kwargs, activation = read_fields(fields, source)
    except KeyError as e:
        raise HFCheckpointError(f"{source}: missing field {e.args[0]!r} for model_type={model_type!r}") from None
    if activation not in _TANH_GELUS:
        raise HFCheckpointError(f"{source}: activation {activation!r} is not supported; expected one of {_TANH_GELUS}")
    if fields.get("tie_word_embeddings"):
        raise HFCheckpointError(f"{source}: tie_word_embeddings=true is not supported; phi's lm_head is untied")
    return PhiConfig(**kwargs), layout


def _transformers_fields(fields: dict, source) -> tuple[dict, str]:
    """(PhiConfig fields, activation name) of a transformers `phi` config (a missing field: KeyError)."""
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    rope = fields.get("rope_parameters") or {}
    _require(rope, source, "rope_type", "default", lambda v: v == "default")
    _require(fields, source, "rope_scaling", None, lambda v: v is None)
    _require(fields, source, "qk_layernorm", False, lambda v: not v)
    _require(fields, source, "num_key_value_heads", heads, lambda v: v in (None, heads))
    partial = rope.get("partial_rotary_factor", fields.get("partial_rotary_factor", 0.5))
    return dict(
        vocab_size=fields["vocab_size"], hidden_size=hidden, num_heads=heads, head_dim=hidden // heads,
        intermediate_size=fields["intermediate_size"], num_layers=fields["num_hidden_layers"],
        rotary_dim=int(hidden // heads * partial),
        rope_theta=float(rope.get("rope_theta", fields.get("rope_theta", 10000.0))),
        max_position_embeddings=fields.get("max_position_embeddings", 2048),
        layer_norm_eps=fields.get("layer_norm_eps", 1e-5),
        embed_dropout=fields.get("embd_pdrop", 0.0), residual_dropout=fields.get("resid_pdrop", 0.0),
        attention_dropout=fields.get("attention_dropout", 0.0),
    ), fields.get("hidden_act", "gelu_new")


def _remote_code_fields(fields: dict, source) -> tuple[dict, str]:
    """(PhiConfig fields, activation name) of a MixFormer or phi-msft config, the layouts of the
    original remote code (a missing field: KeyError)."""
    hidden, heads = fields["n_embd"], fields["n_head"]
    _require(fields, source, "n_head_kv", heads, lambda v: v in (None, heads))
    multiple = fields.get("pad_vocab_size_multiple", 64)
    return dict(
        vocab_size=int(math.ceil(fields["vocab_size"] / multiple) * multiple),
        hidden_size=hidden, num_heads=heads, head_dim=hidden // heads,
        intermediate_size=fields.get("n_inner") or 4 * hidden, num_layers=fields["n_layer"],
        rotary_dim=fields.get("rotary_dim", 32), max_position_embeddings=fields.get("n_positions", 2048),
        layer_norm_eps=fields.get("layer_norm_epsilon", 1e-5),
        embed_dropout=fields.get("embd_pdrop", 0.0), residual_dropout=fields.get("resid_pdrop", 0.0),
        attention_dropout=fields.get("attn_pdrop", 0.0),
    ), fields.get("activation_function", "gelu_new")


def config_to_hf(config: PhiConfig, dtype: str = "float32") -> dict:
    partial_rotary_factor = config.rotary_dim / config.head_dim
    special = PHI_EOS_ID if config.vocab_size >= PHI_BASE_VOCAB else None
    return {
        "architectures": ["PhiForCausalLM"], "model_type": "phi",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_heads,
        "hidden_act": "gelu_new", "max_position_embeddings": config.max_position_embeddings,
        "layer_norm_eps": config.layer_norm_eps, "initializer_range": config.initializer_range,
        "embd_pdrop": config.embed_dropout, "resid_pdrop": config.residual_dropout,
        "attention_dropout": config.attention_dropout, "qk_layernorm": False, "tie_word_embeddings": False,
        # Both spellings: transformers < 5 reads the top-level keys, 5.x reads rope_parameters.
        "rope_theta": config.rope_theta, "partial_rotary_factor": partial_rotary_factor,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                            "partial_rotary_factor": partial_rotary_factor},
        "bos_token_id": special, "eos_token_id": special, "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype,
    }


# ---------------------------------------------------------------------------------------------
# weight names: each layout -> hf names, hf names <-> params tree

def _legacy_names(layout: str, num_layers: int) -> dict[str, str | tuple[str, ...]]:
    """Legacy name -> hf name, or -> (q, k, v) hf names for a fused Wqkv split by rows in thirds."""
    if layout == "mixformer":
        embed, layer, head = "layers.0.wte", lambda i: f"layers.{i + 1}", f"layers.{num_layers + 1}"
        final_ln, lm_head = f"{head}.ln", f"{head}.linear"
    else:
        embed, layer = "transformer.embd.wte", lambda i: f"transformer.h.{i}"
        final_ln, lm_head = "lm_head.ln", "lm_head.linear"
    names = {f"{embed}.weight": "model.embed_tokens.weight"}
    for i in range(num_layers):
        src, dst = layer(i), f"model.layers.{i}"
        for w in ("weight", "bias"):
            names[f"{src}.ln.{w}"] = f"{dst}.input_layernorm.{w}"
            names[f"{src}.mixer.Wqkv.{w}"] = tuple(f"{dst}.self_attn.{p}_proj.{w}" for p in "qkv")
            names[f"{src}.mixer.out_proj.{w}"] = f"{dst}.self_attn.dense.{w}"
            names[f"{src}.mlp.fc1.{w}"] = f"{dst}.mlp.fc1.{w}"
            names[f"{src}.mlp.fc2.{w}"] = f"{dst}.mlp.fc2.{w}"
    for w in ("weight", "bias"):
        names[f"{final_ln}.{w}"] = f"model.final_layernorm.{w}"
        names[f"{lm_head}.{w}"] = f"lm_head.{w}"
    return names


def _expected_shapes(config: PhiConfig, layout: str) -> dict[str, tuple]:
    hf = _hf_shapes(config)
    if layout == "hf":
        return hf
    return {src: ((3 * hf[dst[0]][0],) + hf[dst[0]][1:] if isinstance(dst, tuple) else hf[dst])
            for src, dst in _legacy_names(layout, config.num_layers).items()}


def _check_tensors(tensors: dict, config: PhiConfig, layout: str, source):
    expected = _expected_shapes(config, layout)
    found = {k: tuple(t.shape) for k, t in tensors.items() if not _IGNORED_KEYS.match(k)}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise HFCheckpointError(f"{source}: missing key {missing[0]!r} (expected shape {expected[missing[0]]}) "
                                f"for the {layout} layout; {len(missing)} missing in all")
    if extra:
        raise HFCheckpointError(f"{source}: unexpected key {extra[0]!r} with shape {found[extra[0]]} "
                                f"for the {layout} layout; {len(extra)} unexpected in all")
    for key, shape in expected.items():
        if found[key] != shape:
            raise HFCheckpointError(f"{source}: key {key!r} has shape {found[key]}, expected {shape}")


def _to_hf_names(tensors: dict, config: PhiConfig, layout: str) -> dict:
    if layout == "hf":
        return {k: t for k, t in tensors.items() if not _IGNORED_KEYS.match(k)}
    renamed = {}
    for src, dst in _legacy_names(layout, config.num_layers).items():
        if isinstance(dst, tuple):
            renamed.update(zip(dst, np.split(tensors[src], 3, axis=0)))
        else:
            renamed[dst] = tensors[src]
    return renamed


# (hf name suffix, params path, n_in): a flax kernel [in..., out...] with n_in input axes is a torch
# Linear weight [out, in] in HF; n_in 0 marks a param that HF holds in one axis (biases and LayerNorm;
# the q/k/v biases are [heads, head_dim] in flax), and _AS_IS the embedding, [vocab, hidden] in both.
_AS_IS = None
_LAYER_TABLE = [
    ("input_layernorm.weight", ("ln", "scale"), 0), ("input_layernorm.bias", ("ln", "bias"), 0),
    *[(f"self_attn.{p}_proj.weight", ("attn", f"{p}_proj", "kernel"), 1) for p in "qkv"],
    *[(f"self_attn.{p}_proj.bias", ("attn", f"{p}_proj", "bias"), 0) for p in "qkv"],
    ("self_attn.dense.weight", ("attn", "dense", "kernel"), 2), ("self_attn.dense.bias", ("attn", "dense", "bias"), 0),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), 1), ("mlp.fc1.bias", ("mlp", "fc1", "bias"), 0),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), 1), ("mlp.fc2.bias", ("mlp", "fc2", "bias"), 0),
]
_TOP_TABLE = [
    ("model.embed_tokens.weight", ("embed", "embedding"), _AS_IS),
    ("model.final_layernorm.weight", ("final_ln", "scale"), 0),
    ("model.final_layernorm.bias", ("final_ln", "bias"), 0),
    ("lm_head.weight", ("lm_head", "kernel"), 1), ("lm_head.bias", ("lm_head", "bias"), 0),
]


def _name_table(num_layers: int):
    table = list(_TOP_TABLE)
    for i in range(num_layers):
        table += [(f"model.layers.{i}.{suffix}", (f"layers_{i}",) + path, n_in) for suffix, path, n_in in _LAYER_TABLE]
    return table


def _hf_shape(shape: tuple, n_in: int | None) -> tuple:
    """The HF shape of a param of flax shape `shape` (n_in: see _LAYER_TABLE)."""
    if n_in is _AS_IS:
        return shape
    if n_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _hf_shapes(config: PhiConfig) -> dict[str, tuple]:
    """hf name -> shape, from our params' shapes through the name tables."""
    shapes = param_shapes(config.replace(scan_layers=False))
    return {name: _hf_shape(_get(shapes, path).shape, n_in) for name, path, n_in in _name_table(config.num_layers)}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _hf_to_params(hf_tensors: dict, config: PhiConfig):
    """torch Linear weights are [out, in]; flax kernels are [in..., out...]."""
    shapes = param_shapes(config.replace(scan_layers=False))
    params = {}
    for name, path, n_in in _name_table(config.num_layers):
        tensor = np.asarray(hf_tensors[name], np.float32)
        if n_in:
            tensor = tensor.T
        _set(params, path, tensor.reshape(_get(shapes, path).shape))
    return stack_layers(params, config.num_layers) if config.scan_layers else params


def params_to_hf(config: PhiConfig, params, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The params tree (scanned or not, as `config` says) -> hf-named numpy tensors of `dtype`."""
    _check_params(config, params)
    params = jax.device_get(unstack_layers(params, config.num_layers) if config.scan_layers else params)
    tensors = {}
    for name, path, n_in in _name_table(config.num_layers):
        value = np.asarray(_get(params, path), np.float32)
        hf_shape = _hf_shape(value.shape, n_in)
        if n_in:  # [in..., out...] -> [out, in]
            value = value.reshape(hf_shape[::-1]).T
        tensors[name] = np.ascontiguousarray(value.reshape(hf_shape).astype(EXPORT_DTYPES[dtype]))
    return tensors


def _check_params(config: PhiConfig, params):
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
    found = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    found_keys = {jax.tree_util.keystr(k) for k in found}
    for path, shape in expected:
        key = jax.tree_util.keystr(path)
        if key not in found_keys:
            raise HFCheckpointError(f"params: missing {key} (expected shape {shape.shape}); "
                                    f"scan_layers={config.scan_layers} in the config")
        if tuple(found[path].shape) != shape.shape:
            raise HFCheckpointError(f"params: {key} has shape {tuple(found[path].shape)}, expected {shape.shape}")
    if len(found) != len(expected):
        extra = sorted(found_keys - {jax.tree_util.keystr(k) for k, _ in expected})
        raise HFCheckpointError(f"params: unexpected {extra[0]} for this config; {len(extra)} unexpected in all")


# ---------------------------------------------------------------------------------------------
# reading and writing files


def _read_torch_bin(file: pathlib.Path) -> dict:
    try:
        import torch
    except ImportError:
        raise HFCheckpointError(
            f"{file}: a pickled PyTorch checkpoint, which phi-jax reads only through torch's weights-only "
            "loader, and torch is not installed. Install it (pip install 'phi-jax[hf]') or convert the "
            "file to safetensors with torch on another machine "
            "(safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')).") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise HFCheckpointError(f"{file}: not a readable PyTorch checkpoint of tensors "
                                f"(truncated or corrupt?): {e}") from None
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _read_weight_file(file: pathlib.Path) -> dict:
    if file.suffix == ".safetensors":
        try:
            return safetensors.numpy.load_file(file)
        except safetensors.SafetensorError as e:
            raise HFCheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return _read_torch_bin(file)


def _read_json_object(file: pathlib.Path) -> dict:
    try:
        fields = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{file}: not valid JSON ({e}); expected a JSON object") from None
    if not isinstance(fields, dict):
        raise HFCheckpointError(f"{file}: holds a JSON {type(fields).__name__}; expected a JSON object")
    return fields


def read_tensors(path) -> dict[str, np.ndarray]:
    """All weights of a checkpoint directory: single or sharded, safetensors or pytorch_model.bin."""
    path = pathlib.Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            weight_map = _read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise HFCheckpointError(f"{index}: no 'weight_map' object of tensor name -> shard file name")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).exists():
                    raise HFCheckpointError(f"{index}: names shard {shard!r}, which is not in {path}")
                tensors.update(_read_weight_file(path / shard))
            return tensors
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).exists():
            return _read_weight_file(path / single)
    raise HFCheckpointError(f"{path}: no weights found; expected model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin or pytorch_model.bin.index.json")


def load(path, **config_changes) -> tuple[PhiConfig, dict]:
    """(PhiConfig, float32 params) from a Hugging Face checkpoint directory.

    `config_changes` adjust the returned config (e.g. scan_layers=True, dtype="bfloat16", remat);
    the params come laid out for it.
    """
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise HFCheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    config, layout = config_from_hf(_read_json_object(config_file), config_file)
    config = config.replace(**config_changes)
    tensors = read_tensors(path)
    _check_tensors(tensors, config, layout, path)
    return config, _hf_to_params(_to_hf_names(tensors, config, layout), config)


def save(config: PhiConfig, params, path, dtype: str = "float32",
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, *,
         config_fields: dict | None = None, extra_files: dict[str, str] | None = None):
    """Writes a transformers PhiForCausalLM directory; sharded with an index above `max_shard_bytes`.

    `config_fields` replace config.json's (e.g. the tokenizer's bos/eos ids); `extra_files` ({name: text},
    the tokenizer, generation config, model card) are written into the directory before it appears.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"hf.save: dtype must be one of {sorted(EXPORT_DTYPES)}, found {dtype!r}")
    tensors = params_to_hf(config, params, dtype)
    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors.items():
        if current and current_bytes + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += tensor.nbytes
    shards.append(current)

    with atomic_directory(path, overwrite=overwrite) as tmp:
        fields = {**config_to_hf(config, dtype), **(config_fields or {})}
        (tmp / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if len(shards) == 1:
            safetensors.numpy.save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, tmp / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
