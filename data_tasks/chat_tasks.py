"""Chat tasks: conversations in JSON lines, rendered with a chat template and tokenized once
(phi_jax.data.chat.encode_chat), each example {"targets": token ids, "loss_mask": 1 on assistant tokens}.

A record is any of phi_jax.data.chat.RECORD_FORMATS: `messages` ([{role, content}]), `conversations`
(ShareGPT / OpenHermes [{from, value}]), Alpaca (`instruction`, `input`, `output`) or
`prompt`/`completion`. The template is the one beside the tokenizer the task was registered with
(`phi-jax data prepare` puts the chosen one there, as chat_template.jinja). A record that is not a
conversation, names an unknown role or has no assistant turn is skipped and counted with its file:line,
like any bad input. No EOS is appended: the template ends each assistant turn with its own end-of-turn
token, inside the mask.
"""

import numpy as np
import seqio
import tensorflow as tf

from data_tasks.sources import TextFileSource, jsonl_records
from phi_jax.data.chat import ChatError, encode_chat, messages_of
from phi_jax.data.registry import DataError
from phi_jax.data.skips import SkipReport

LOSS_MASK = "loss_mask"


class ChatFileSource(TextFileSource):
    """DATA_DIR/<source>/<split>/*.jsonl[.gz] conversations, encoded with the tokenizer.json at
    `tokenizer_file` and the chat template beside it."""

    def __init__(self, task: str, source: str, data_dir, tokenizer_file):
        super().__init__(task, source, data_dir)
        self._tokenizer_file = str(tokenizer_file)

    def _conversations(self, path: str, report: SkipReport):
        if not path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            raise DataError(f"task {self._task!r}: {path}: a chat task reads JSON lines (.jsonl[.gz], .json[.gz]), "
                            "one conversation a line")
        for where, record in jsonl_records(path, report):
            try:
                ids, mask = encode_chat(messages_of(record), self._tokenizer_file)
            except ChatError as e:
                report.skip(_reason(e), where)
                continue
            yield {"targets": np.asarray(ids, np.int32), LOSS_MASK: np.asarray(mask, np.int32)}

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed=None, shard_info=None,
                    *, sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
        shards = self.list_shards(split)
        if shard_info is not None:
            shards = shards[shard_info.index::shard_info.num_shards]

        def generate():
            for shard in shards:
                report = SkipReport()
                yield from self._conversations(shard, report)
                self._reports[shard] = report

        spec = tf.TensorSpec([None], tf.int32)
        return tf.data.Dataset.from_generator(generate, output_signature={"targets": spec, LOSS_MASK: spec})


def _reason(error: ChatError) -> str:
    """A skip reason that groups alike records (the positions keep the full messages' places)."""
    text = str(error)
    for reason in ("unknown role", "unknown speaker", "no assistant turn", "chat template"):
        if reason in text:
            return reason
    return "not a conversation"


def add_chat_task(name: str, source: str, data_dir, tokenizer_file, vocabulary: seqio.Vocabulary) -> None:
    """A chat task reading `data_dir/<source>/<split>/*.jsonl[.gz]`, replacing any task of that name."""
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=ChatFileSource(name, source, data_dir, tokenizer_file),
        preprocessors=[],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
                         LOSS_MASK: seqio.Feature(seqio.PassThroughVocabulary(2), add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=10_000,
    )

