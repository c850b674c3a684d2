"""`phi-jax export-hf`: a checkpoint as a Hugging Face directory that transformers loads as it is.

    export(CKPT, OUT_DIR)   # a training workdir, a params checkpoint or a Hugging Face directory

writes, besides the weights and config.json (phi_jax.hf.save):
  tokenizer.json, tokenizer_config.json   the checkpoint's tokenizer (or --tokenizer), with the chat
                                          template when the run or the tokenizer has one (or --chat_template)
  special_tokens_map.json                 bos, eos and unk, as phi has them (all <|endoftext|>)
  generation_config.json                  eos_token_id: the end of text and the template's end-of-turn ids
  README.md                               a model card: architecture, training (mixture, tokens, steps),
                                          the chat template, eval results when the workdir has them

so that AutoTokenizer.from_pretrained, AutoModelForCausalLM.from_pretrained and
pipeline("text-generation") (chat messages included) read it with nothing added. Everything is
written into a temporary directory that becomes OUT_DIR only when complete.
"""

import ast
import dataclasses
import json
import logging
import pathlib
import re

from phi_jax import checkpoint, hf
from phi_jax.config import PhiConfig
from phi_jax.conversation import end_of_turn_ids, find_template
from phi_jax.data.tokenizer import Tokenizer, resolve_tokenizer
from phi_jax.errors import PhiJaxError

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CARD_FILE = "README.md"


@dataclasses.dataclass
class Export:
    """What an export holds, for the command's summary line."""
    tokenizer: Tokenizer | None
    chat_template: str | None
    stop_ids: list[int]


def export(ckpt, out_dir, *, step: int | None = None, dtype: str = "float32",
           max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, tokenizer=None, chat_template=None,
           overwrite: bool = False) -> Export:
    """Writes OUT_DIR (see the module doc). `tokenizer`: as resolve_tokenizer takes it (None: the
    checkpoint's own; without one the export holds the model alone, and says so). `chat_template`: a
    built-in name, a .jinja file, a tokenizer_config.json or a Jinja string; None: the checkpoint's own,
    else its tokenizer's."""
    ckpt = pathlib.Path(ckpt)
    tok = resolve_tokenizer(tokenizer, ckpt, required=False)
    template = find_template(chat_template, ckpt, tok)
    workdir = (ckpt / "checkpoints").is_dir()
    if step is not None and not workdir:
        raise ValueError(f"--step {step}: {ckpt} is not a training workdir, it holds one model")
    chosen_step = checkpoint.checkpoint_step(ckpt, step) if workdir else None
    config, params = checkpoint.load_model(ckpt, chosen_step)
    files, config_fields, stop_ids = {}, {}, []
    if tok is None:
        logger.warning(f"{ckpt}: no tokenizer.json, so the export holds the model alone; pass --tokenizer to add one")
    else:
        if tok.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model's vocab_size is "
                             f"{config.vocab_size}: they are not one model's")
        stop_ids = end_of_turn_ids(tok, template)
        files.update(_tokenizer_files(tok, template, config))
        files[GENERATION_CONFIG_FILE] = _json({"bos_token_id": tok.eos_id, "eos_token_id": stop_ids,
                                               "pad_token_id": tok.eos_id})
        config_fields = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}
    files[MODEL_CARD_FILE] = model_card(pathlib.Path(out_dir).name, config, ckpt, chosen_step, tok, template,
                                        stop_ids, dtype)
    hf.save(config, params, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
            config_fields=config_fields, extra_files=files)
    return Export(tok, template, stop_ids)


def _json(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _tokenizer_files(tok: Tokenizer, template: str | None, config: PhiConfig) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json. A tokenizer_config.json beside
    the tokenizer (phi-1.5's, with its CodeGenTokenizer class) is kept, with the chat template set; else
    one is made for the fast tokenizer every transformers version reads."""
    from phi_jax.data import chat

    eos = tok.token(tok.eos_id)
    own = tok.path.with_name(chat.CONFIG_FILE)
    fields = json.loads(own.read_text()) if own.is_file() else {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos, "unk_token": eos,
        "model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False}
    fields.pop("chat_template", None)
    if template is not None:
        fields["chat_template"] = template
    special = {name: fields.get(name, eos) for name in ("bos_token", "eos_token", "unk_token")}
    return {"tokenizer.json": tok.path.read_text(), chat.CONFIG_FILE: _json(fields),
            chat.SPECIAL_TOKENS_FILE: _json(special)}


# --------------------------------------------------------------------------------------------- the model card


def read_operative_config(path) -> dict[str, object]:
    """{"TrainConfig.batch_size": 8, "OptimizerConfig.learning_rate": 0.002, ...} of a run's config.gin,
    macros resolved; values that are not Python literals stay as their text. Read by hand rather than
    with gin, which is not installed on every machine and needs the run's configurables registered."""
    macros, bindings = {}, {}
    for line in pathlib.Path(path).read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z_][\w.]*) = (.+)", line.strip())
        if not match:
            continue
        name, text = match.groups()
        (bindings if "." in name else macros)[name] = text
    return {name: _literal(macros.get(text[1:], text) if text.startswith("%") else text)
            for name, text in bindings.items()}


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def model_card(name: str, config: PhiConfig, ckpt: pathlib.Path, step: int | None, tok: Tokenizer | None,
               template: str | None, stop_ids: list[int], dtype: str) -> str:
    """README.md: YAML front matter for the Hub, then what the model is and how it was made."""
    architecture = [
        ("parameters", f"{config.num_params:,}"), ("layers", config.num_layers), ("hidden size", config.hidden_size),
        ("attention heads", f"{config.num_heads} x {config.head_dim}"), ("MLP size", config.intermediate_size),
        ("rotary dims", f"{config.rotary_dim} of {config.head_dim}"),
        ("context", f"{config.max_position_embeddings} tokens"),
        ("vocabulary", f"{config.vocab_size} rows" + (f", tokenizer {tok.vocab_size} ids" if tok else ""))]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- phi", "- phi-jax",
             "---", "", f"# {name}", "",
             f"A phi model (transformers `PhiForCausalLM`, {dtype}) exported by phi-jax from `{ckpt.resolve()}`"
             + (f", step {step}." if step is not None else "."), "", "## Architecture", "", "| | |", "|---|---|",
             *(f"| {key} | {value} |" for key, value in architecture), ""]
    lines += _training_section(ckpt, step)
    if template is not None:
        ends = ", ".join(f"`{tok.token(i)}` ({i})" for i in stop_ids)
        lines += ["## Chat template", "", f"Replies end with {ends}; generation_config.json stops on each.", "",
                  "```jinja", template.strip("\n"), "```", ""]
    lines += _eval_section(ckpt)
    lines += ["## Use", "", "```python", "from transformers import pipeline", "",
              f'generate = pipeline("text-generation", model="{name}")']
    if template is not None:
        lines += ['print(generate([{"role": "user", "content": "Write a haiku about JAX."}], max_new_tokens=64))']
    else:
        lines += ['print(generate("def fibonacci(n):", max_new_tokens=64))']
    return "\n".join(lines + ["```", ""])


def _training_section(ckpt: pathlib.Path, step: int | None) -> list[str]:
    if not (ckpt / "config.gin").is_file():
        return []
    from phi_jax.trainer import TrainConfig

    run = read_operative_config(ckpt / "config.gin")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    value = {k: run.get(f"TrainConfig.{k}", defaults.get(k)) for k in
             ("mixture", "data_dir", "batch_size", "seq_len", "packing", "init_from", "train_steps")}
    lines = ["## Training", "", f"- mixture `{value['mixture']}`" + _shares(value["mixture"], value["data_dir"])]
    if value["init_from"]:
        lines.append(f"- fine-tuned from `{value['init_from']}`")
    if step is not None:
        tokens = step * value["batch_size"] * value["seq_len"]
        lines.append(f"- {step:,} steps of {value['batch_size']} x {value['seq_len']} tokens ({value['packing']} "
                     f"packing): {tokens:,} tokens, of {value['train_steps']:,} steps planned")
    learning_rate = run.get("OptimizerConfig.learning_rate")
    if learning_rate is not None:
        lines.append(f"- peak learning rate {learning_rate}, schedule {run.get('OptimizerConfig.schedule', '-')}")
    return lines + ["", "The run's whole operative gin config is its `config.gin`.", ""]


def _shares(mixture: str, data_dir) -> str:
    """': task 60%, ...' from the prepared mixture when it is readable here (never building the default
    corpus, never asking $PHI_JAX_DATA_DIR); the data may live on another machine."""
    from phi_jax.data import corpus, shards

    if not data_dir and mixture != "default":
        return ""
    root = shards.prepared_root(data_dir) if data_dir else corpus.prepared_dir()
    try:
        shares = shards.read_mixture(root, mixture)["shares"]
    except (PhiJaxError, OSError, ValueError) as e:
        logger.info(f"model card: the shares of mixture {mixture!r} are not readable here ({e})")
        shares = None
    if not shares:
        return ""
    return ": " + ", ".join(f"{task} {share:.0%}" for task, share in sorted(shares.items(), key=lambda kv: -kv[1]))


def _eval_section(ckpt: pathlib.Path) -> list[str]:
    path = ckpt / "eval_results.json"
    if not path.is_file():
        return []
    tasks = json.loads(path.read_text()).get("tasks", {})
    lines = ["## Evaluation", "", "`phi-jax eval` on this run:", "", "| task | metric | value | documents | step |",
             "|---|---|---|---|---|"]
    for task, result in sorted(tasks.items()):
        metric = result.get("metric")
        value = result.get("metrics", {}).get(metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        lines.append(f"| {task} | {metric} | {shown} | {result.get('num_docs', '-')} | {result.get('step', '-')} |")
    return lines + [""]
