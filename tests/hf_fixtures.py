"""Helpers for the Hugging Face checkpoint tests: tiny random transformers phi models and the two
legacy phi checkpoint layouts (original MixFormer, phi-msft) produced from them by renaming.

Nothing here touches the network; every checkpoint is written by the test that uses it.
"""

import json
import os
import pathlib
import struct

import numpy as np
import safetensors.numpy
import torch
import transformers


def make_hf_model(seed: int, **config_fields) -> transformers.PhiForCausalLM:
    """A seeded random PhiForCausalLM whose every parameter is perturbed away from its init.

    transformers initializes biases to 0 and LayerNorms to (1, 0); a loader that swaps or drops a
    bias would still match on such a model. Here all weights are normal(0.08), all biases
    normal(0.05), LayerNorm scales 1 + normal(0.1) and LayerNorm biases normal(0.1).
    """
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**config_fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "layernorm" in name:
                param.normal_(0.0, 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.05)
            else:
                param.normal_(0.0, 0.08)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, tokens: np.ndarray, steps: int) -> np.ndarray:
    """`steps` greedy tokens after `tokens` [B, T], by repeated full forwards (no cache, no generate)."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            next_ids = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            new.append(next_ids)
            ids = torch.cat([ids, next_ids], dim=1)
    return torch.cat(new, dim=1).numpy()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# legacy layouts


def _legacy_state(state: dict, num_layers: int, embed: str, layer, final_ln: str, lm_head: str,
                  rotary_dim: int | None) -> dict[str, np.ndarray]:
    out = {f"{embed}.weight": state["model.embed_tokens.weight"]}
    for i in range(num_layers):
        src, dst = f"model.layers.{i}", layer(i)
        for w in ("weight", "bias"):
            out[f"{dst}.ln.{w}"] = state[f"{src}.input_layernorm.{w}"]
            out[f"{dst}.mixer.Wqkv.{w}"] = np.concatenate(
                [state[f"{src}.self_attn.{p}_proj.{w}"] for p in "qkv"], axis=0)
            out[f"{dst}.mixer.out_proj.{w}"] = state[f"{src}.self_attn.dense.{w}"]
            out[f"{dst}.mlp.fc1.{w}"] = state[f"{src}.mlp.fc1.{w}"]
            out[f"{dst}.mlp.fc2.{w}"] = state[f"{src}.mlp.fc2.{w}"]
        if rotary_dim is not None:
            # The buffer the remote code saved beside the weights; a loader must ignore it.
            out[f"{dst}.mixer.rotary_emb.inv_freq"] = (
                1.0 / 10000 ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)).astype(np.float32)
    for w in ("weight", "bias"):
        out[f"{final_ln}.{w}"] = state[f"model.final_layernorm.{w}"]
        out[f"{lm_head}.{w}"] = state[f"lm_head.{w}"]
    return out


def _legacy_config_fields(hf_config, rotary_dim: int) -> dict:
    return {
        "vocab_size": hf_config.vocab_size, "n_embd": hf_config.hidden_size,
        "n_head": hf_config.num_attention_heads, "n_layer": hf_config.num_hidden_layers,
        "rotary_dim": rotary_dim, "n_positions": hf_config.max_position_embeddings,
        "layer_norm_epsilon": hf_config.layer_norm_eps, "activation_function": "gelu_new",
        "embd_pdrop": 0.0, "resid_pdrop": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def write_mixformer(model, path) -> pathlib.Path:
    """The original MixFormer (Sep 2023) checkpoint of `model`: layers.0 embedding, layers.{L+1} head."""
    cfg, L = model.config, model.config.num_hidden_layers
    rotary_dim = int(cfg.hidden_size // cfg.num_attention_heads * cfg.rope_parameters["partial_rotary_factor"])
    state = _legacy_state(state_dict_numpy(model), L, "layers.0.wte", lambda i: f"layers.{i + 1}",
                          f"layers.{L + 1}.ln", f"layers.{L + 1}.linear", rotary_dim)
    fields = {"model_type": "mixformer-sequential", "architectures": ["MixFormerSequentialForCausalLM"],
              **_legacy_config_fields(cfg, rotary_dim)}
    # The MixFormer configs left n_inner null (4 * n_embd).
    fields["n_inner"] = None if cfg.intermediate_size == 4 * cfg.hidden_size else cfg.intermediate_size
    return write_checkpoint(path, fields, state)


def write_phi_msft(model, path) -> pathlib.Path:
    """The phi-msft (Dec 2023) checkpoint of `model`: transformer.embd / transformer.h.{i} / lm_head.{ln,linear}."""
    cfg, L = model.config, model.config.num_hidden_layers
    rotary_dim = int(cfg.hidden_size // cfg.num_attention_heads * cfg.rope_parameters["partial_rotary_factor"])
    state = _legacy_state(state_dict_numpy(model), L, "transformer.embd.wte", lambda i: f"transformer.h.{i}",
                          "lm_head.ln", "lm_head.linear", None)
    fields = {"model_type": "phi-msft", "architectures": ["PhiForCausalLM"], "n_head_kv": None,
              "n_inner": cfg.intermediate_size, "attn_pdrop": 0.0, "flash_attn": False,
              **_legacy_config_fields(cfg, rotary_dim)}
    return write_checkpoint(path, fields, state)


def write_checkpoint(path, config_fields: dict, state: dict) -> pathlib.Path:
    """A new checkpoint directory with this config.json and one model.safetensors."""
    path = pathlib.Path(path)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config_fields, indent=2))
    safetensors.numpy.save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------
# inspecting written files


def safetensors_dtypes(file) -> dict[str, str]:
    """{tensor name: dtype as the file's header spells it ("F32", "BF16", ...)}, read framework-free."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def listing(directory) -> list[str]:
    """Every entry under `directory` (recursively, hidden ones included), relative, sorted."""
    directory = pathlib.Path(directory)
    return sorted(str(pathlib.Path(root, name).relative_to(directory))
                  for root, dirs, files in os.walk(directory) for name in dirs + files)
