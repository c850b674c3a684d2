"""phi-jax's tasks module: phi's data mixtures, and seqio Tasks that read them (phi_jax.data.registry
describes what a tasks module is; `phi-jax data ... --tasks_module` picks one, this by default).

Importing this package is cheap (plain Python, no TensorFlow): MIXTURES is read to refuse a misspelled
name at once. `register(data_dir, tokenizer)` imports seqio and TensorFlow and registers:

Tasks (each `{"targets": token ids + EOS}` through rekey -> tokenize -> append_eos):
  synthetic, code, web      read DATA_DIR/<source>/{train,validation}/* (see data_tasks.sources for the
                            formats), tokenized with `tokenizer` (default DATA_DIR/tokenizer.json).
  default_synthetic, default_code, default_web
                            the embedded corpus (phi_jax.data.corpus) and its own BPE tokenizer.
  chat                      DATA_DIR/chat/{train,validation}/*.jsonl[.gz] conversations (data_tasks.chat_tasks),
                            {"targets", "loss_mask"}, with the chat template `prepare` puts beside the tokenizer.
  default_chat              the built-in chat set (questions and answers about the synthetic lessons), phi template.
Mixtures: phi1, phi15, phi15_web, phi15_web_only, default, default_chat, chat, with the token shares of MIXTURES, for
seqio's own users (T5X and the like): seqio's rates count examples, so each rate is share / (mean
tokens per document), from the task's prepared statistics when they exist. phi-jax's stream never
reads these rates: it mixes by the shares `phi-jax data prepare` records in the prepared directory.

Your own data: write your own tasks module (MIXTURES and register; it may call
`data_tasks.seqio_tasks.register` and `add_text_task` for phi's tasks and formats) and pass
`--tasks_module my_project.tasks` to `phi-jax data`. No edit here or in phi_jax is needed.

Shares are fractions of training *tokens* (not documents), from the phi papers:
  phi1            code 6/7, synthetic 1/7   (about 6B filtered code + 1B synthetic textbook tokens)
  phi15           synthetic 0.8, code 0.2   (80% new synthetic + 20% phi-1 data)
  phi15_web       web 0.4, code 0.2, synthetic 0.4
  phi15_web_only  web 0.8, code 0.2
  default         the embedded corpus (Python's stdlib code, its docs, our synthetic textbooks)
"""

SOURCES = ("synthetic", "code", "web")
# Chat tasks (data_tasks.chat_tasks): DATA_DIR/chat/{train,validation}/*.jsonl[.gz], one conversation a line.
CHAT_SOURCES = ("chat",)
# The embedded default corpus: task name -> the source directory it reads under its raw_dir().
DEFAULT_TASKS = {"default_synthetic": "synthetic", "default_code": "code", "default_web": "web"}
DEFAULT_CHAT_TASKS = {"default_chat": "chat"}
# The chat tasks, each with the chat template it uses when neither `phi-jax data prepare --chat_template`
# nor the tokenizer's directory gives one (None: one of those must).
CHAT_TASKS: dict[str, str | None] = {"chat": None, "default_chat": "phi"}

MIXTURES: dict[str, dict[str, float]] = {
    "phi1": {"code": 6 / 7, "synthetic": 1 / 7},
    "phi15": {"synthetic": 0.8, "code": 0.2},
    "phi15_web": {"web": 0.4, "code": 0.2, "synthetic": 0.4},
    "phi15_web_only": {"web": 0.8, "code": 0.2},
    "default": {"default_synthetic": 0.4, "default_code": 0.3, "default_web": 0.3},
    # Instruction tuning on the built-in chat set (questions and answers about the synthetic lessons).
    "default_chat": {"default_chat": 1.0},
    "chat": {"chat": 1.0},
}


def register(data_dir=None, tokenizer=None) -> None:
    """Registers the tasks and mixtures above with seqio, the DATA_DIR ones reading `data_dir` (None:
    not registered) tokenized with `tokenizer` (None: DATA_DIR/tokenizer.json)."""
    from data_tasks import seqio_tasks

    seqio_tasks.register(data_dir, tokenizer)


def describe_task(name: str) -> str:
    """What a task reads, for `phi-jax data list`."""
    if name in DEFAULT_TASKS or name in DEFAULT_CHAT_TASKS:
        from phi_jax.data import corpus

        source = {**DEFAULT_TASKS, **DEFAULT_CHAT_TASKS}[name]
        return f"{corpus.raw_dir()}/{source}/{{train,validation}}/*" + (" (chat)" if name in CHAT_TASKS else "")
    return f"DATA_DIR/{name}/{{train,validation}}/*" + (" (chat: messages, conversations, instruction/output or "
                                                       "prompt/completion records)" if name in CHAT_TASKS else "")
