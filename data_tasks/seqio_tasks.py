"""Registering phi-jax's seqio Tasks and Mixtures (data_tasks.register calls `register`). Imports seqio
and TensorFlow; every task reads the DATA_DIR and tokenizer it was registered with, so registering
again with other ones replaces it (one process can prepare several DATA_DIRs in turn).
"""

import functools
import os

import seqio
import tensorflow as tf

from data_tasks import CHAT_SOURCES, DEFAULT_CHAT_TASKS, DEFAULT_TASKS, MIXTURES, SOURCES
from data_tasks.chat_tasks import add_chat_task
from data_tasks.sources import TextFileSource
from data_tasks.vocab import HFTokenizerVocabulary
from phi_jax.data import corpus, shards
from phi_jax.data.registry import DataError

# TensorFlow only reads and tokenizes here: keep it off the GPUs, which belong to JAX (TF would
# otherwise reserve their memory in the training process when it prepares the default corpus).
tf.config.set_visible_devices([], "GPU")


def add_text_task(name: str, source: str, data_dir, vocabulary: seqio.Vocabulary, preprocessors=()) -> None:
    """A text task reading `data_dir/<source>/<split>/*` (any format of data_tasks.sources), replacing any
    task of that name: rekey text -> targets, then `preprocessors` (on text), tokenize, append EOS."""
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=TextFileSource(name, source, data_dir),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            *preprocessors,
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.preprocessors.append_eos,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
        shuffle_buffer_size=10_000,
    )


def _example_rate(task: seqio.Task, share: float, prepared_root) -> float:
    """seqio rate (examples) for a token share: share / mean document length, when it is known."""
    try:
        totals = shards.split_totals(prepared_root, task.name, "train")
        return share * totals["docs"] / max(1, totals["tokens"])
    except DataError:
        return share  # not prepared yet: fall back to treating documents as equal in length


def add_mixture(name: str, shares: dict[str, float], prepared_roots: dict) -> None:
    """A seqio Mixture whose example rates give these token shares, through each task's prepared
    statistics under prepared_roots[task]."""
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(task, functools.partial(_example_rate, share=share,
                                                              prepared_root=prepared_roots[task]))
                                     for task, share in shares.items()])


def register(data_dir=None, tokenizer=None) -> None:
    """The tasks and mixtures of data_tasks (see its doc) for this DATA_DIR and tokenizer."""
    roots = {task: corpus.prepared_dir() for task in DEFAULT_TASKS}
    default_vocab = HFTokenizerVocabulary(corpus.tokenizer_file())
    for task, source in DEFAULT_TASKS.items():
        add_text_task(task, source, corpus.raw_dir(), default_vocab)
    # The built-in chat set is tokenized with its prepared copy of the BPE: its chat template lies beside it.
    chat_root = corpus.prepared_dir("default_chat")
    for task, source in DEFAULT_CHAT_TASKS.items():
        add_chat_task(task, source, corpus.raw_dir(), chat_root / "tokenizer.json",
                      HFTokenizerVocabulary(chat_root / "tokenizer.json"))
        roots[task] = chat_root
    if data_dir is not None:
        tokenizer = tokenizer or os.path.join(data_dir, "tokenizer.json")
        vocab = HFTokenizerVocabulary(tokenizer)
        for source in SOURCES:
            add_text_task(source, source, data_dir, vocab)
            roots[source] = shards.prepared_root(data_dir)
        for source in CHAT_SOURCES:
            add_chat_task(source, source, data_dir, tokenizer, vocab)
            roots[source] = shards.prepared_root(data_dir)
    for name, shares in MIXTURES.items():
        if name in shares:  # a mixture of one task, named as it: seqio finds the task by that name
            continue
        if set(shares) <= set(roots):
            add_mixture(name, shares, roots)
        else:  # its tasks read DATA_DIR, and none was given: not one left from an earlier registration
            seqio.MixtureRegistry.remove(name)
    if data_dir is None:
        for source in SOURCES + CHAT_SOURCES:
            seqio.TaskRegistry.remove(source)
