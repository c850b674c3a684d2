"""seqio Tasks and Mixtures of phi-jax. Importing this package registers them.

Tasks (each `{"targets": token ids + EOS}` through rekey -> tokenize -> append_eos):
  synthetic, code, web      read DATA_DIR/<source>/{train,validation}/* (see data_tasks.sources for the
                            formats), tokenized with DATA_DIR/tokenizer.json. DATA_DIR and the tokenizer
                            come from `set_data_dir` / `set_tokenizer` or $PHI_JAX_DATA_DIR /
                            $PHI_JAX_TOKENIZER, read when the data is, not at import.
  default_synthetic, default_code, default_web
                            the embedded corpus (phi_jax.data.corpus) and its own BPE tokenizer.
Mixtures: phi1, phi15, phi15_web, phi15_web_only, default, with the token shares of
phi_jax.data.registry.MIXTURES. seqio's rates count examples, so each rate here is
share / (mean tokens per document), from the task's prepared statistics when they exist.

Your own: `add_text_task(name, source_subdir)` and `add_mixture(name, {task: token share})`.
"""

import functools

import seqio
import tensorflow as tf

from data_tasks.sources import SkipReport, TextFileSource, take_report
from data_tasks.vocab import HFTokenizerVocabulary
from phi_jax.data import corpus, registry, shards
from phi_jax.data.registry import DataError, set_data_dir, set_tokenizer

# TensorFlow only reads and tokenizes here: keep it off the GPUs, which belong to JAX (TF would
# otherwise reserve their memory in the training process when it prepares the default corpus).
tf.config.set_visible_devices([], "GPU")

__all__ = ["DataError", "HFTokenizerVocabulary", "SkipReport", "TextFileSource", "add_mixture", "add_text_task",
           "set_data_dir", "set_tokenizer", "take_report"]

DATA_DIR_VOCAB = HFTokenizerVocabulary(registry.tokenizer_path, key="DATA_DIR/tokenizer.json")
DEFAULT_VOCAB = HFTokenizerVocabulary(lambda: str(corpus.tokenizer_file()), key="phi-jax default corpus")


def _prepared_dir_for(task_name: str):
    if task_name in registry.DEFAULT_TASKS:
        return corpus.prepared_dir()
    return shards.prepared_root(registry.data_dir(task_name))


def add_text_task(name: str, source: str, data_dir_fn=registry.data_dir, vocabulary=DATA_DIR_VOCAB) -> None:
    """A text task reading `data_dir_fn(name)/<source>/<split>/*`, replacing any task of that name."""
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=TextFileSource(name, source, data_dir_fn),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.preprocessors.append_eos,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
        shuffle_buffer_size=10_000,
    )


def _example_rate(task: seqio.Task, share: float) -> float:
    """seqio rate (examples) for a token share: share / mean document length, when it is known."""
    try:
        totals = shards.split_totals(_prepared_dir_for(task.name), task.name, "train")
        return share * totals["docs"] / max(1, totals["tokens"])
    except DataError:
        return share  # not prepared yet: fall back to treating documents as equal in length


def add_mixture(name: str, shares: dict[str, float]) -> None:
    """A mixture with these token shares: in the grain stream exactly, in seqio through token statistics."""
    registry.MIXTURES[name] = dict(shares)
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(task, functools.partial(_example_rate, share=share))
                                     for task, share in shares.items()])


for _source in registry.SOURCES:
    add_text_task(_source, _source)
for _task, _source in registry.DEFAULT_TASKS.items():
    add_text_task(_task, _source, data_dir_fn=lambda task: str(corpus.raw_dir()), vocabulary=DEFAULT_VOCAB)
for _name, _shares in list(registry.MIXTURES.items()):
    add_mixture(_name, _shares)
