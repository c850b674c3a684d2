"""The training stream: grain over prepared ArrayRecord shards. No TensorFlow, no seqio.

A process's batches come out of five stages, each a grain IterDataset:

  read      TaskDocuments, per task and data shard: documents (token ids, EOS included; a chat task's with
            its loss mask, 1 on the assistant's tokens and end of turn: its only trained targets). For training,
            each epoch is a permutation of all the task's documents (seeded by task and epoch), the
            epochs follow each other endlessly, and data shard s of n reads positions s, s + n, s + 2n,
            ... of that sequence: the shards never read the same document in an epoch, together they
            read each document once an epoch, and any number of shards works with any number of
            documents. For evaluation, one pass in file order: shard s reads documents s, s + n, ...
  mix       TokenShareMix: always draws from the task furthest below its token share (tokens emitted /
            share is smallest), so shares hold to within one document at every step, whatever the
            document lengths, with no statistics needed and nothing random to drift.
  pack      ConcatPacking, phi's recipe: documents (each ending in EOS) concatenated and cut into rows.
              The stream reads as EOS, doc1, EOS, doc2, EOS, ...: row k has tokens[i] = s[kT + i] and
              targets[i] = s[kT + i + 1], so every token is a target exactly once; segment_ids are all
              1 and positions 0..T-1 (attention crosses documents, as phi was trained).
            FirstFitPacking: documents cut into chunks of at most T targets, placed first-fit into a
              window of `num_bins` rows; each chunk is a segment (ids 1, 2, ... in its row) whose tokens
              are [the token before it, or EOS at a document start] + chunk[:-1], targets the chunk,
              positions 0..len-1. A conversation is not put after EOS: its first token is the first
              input (it has weight 0), so a segment is exactly what transformers trains on.
            loss_weights are 1 on a text task's targets and its mask on a chat task's (0 on the prompt,
              1 on the replies with their end-of-turn token), whatever the token: never from token != pad.
              A conversation of at most T + 1 tokens (prepare's max_tokens) stays whole in one segment.
  batch     ShardRows: rows_per_shard rows of each of the process's data shards, side by side, as
            [batch, seq_len] arrays (phi_jax.batch.FIELDS); a finite shard that has ended gives padding.
  prefetch  Prefetch: batches made ahead on a background thread.

Every stage's state is a small JSON dict (each task's read position, tokens emitted per task, where in
the current document or packing window the next row starts), so the next batch after `set_state` is
identical. The state depends on the pipeline's arguments: restore with the same ones.
"""

import atexit
import copy
import dataclasses
import hashlib
import pathlib
import queue
import threading
import weakref

import grain
import numpy as np

from phi_jax import batch as batch_fields
from phi_jax.data import shards
from phi_jax.data.registry import DataError
from phi_jax.data.tokenizer import file_fingerprint

# An extra field for `phi-jax data stats` and `preview` (task_ids=True): the index of the task each
# target came from, -1 on padding.
TASK_IDS = "task_ids"


def padding(shape, task_ids: bool) -> dict:
    """Every field as padding (weight 0, segment 0, token 0; task id -1) of `shape`: a row or a batch."""
    fields = batch_fields.padding(shape)
    if task_ids:
        fields[TASK_IDS] = np.full(shape, -1, np.int32)
    return fields


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's prepared split: its shard files and their statistics."""
    name: str
    paths: tuple[str, ...]
    dtype: str
    docs: int
    tokens: int
    eos_id: int
    vocab_size: int
    tokenizer: str
    masked: bool = False  # a chat task: each document carries its loss mask


def load_task(root, task: str, split: str, mixture: str = "") -> TaskData:
    stats = shards.read_split(root, task, split, mixture)
    first = stats[0]
    return TaskData(task, tuple(s["path"] for s in stats), first["dtype"], sum(s["docs"] for s in stats),
                    sum(s["tokens"] for s in stats), first["eos_id"], first["vocab_size"], first["tokenizer"],
                    bool(first.get(shards.LOSS_MASK)))


def task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:4], "little")


# Up to this many documents in a task, each epoch's order is an explicit permutation (4 bytes a
# document); above, grain's stateless index_shuffle (about 10 us a call, but 0.5 ms on tiny domains).
_PERMUTATION_LIMIT = 1 << 23


class TaskSource:
    """One task's prepared documents in one process, and each training epoch's order. The task's data
    shards in the process share it: one set of open files, one permutation per epoch in use.

    `document(position)` is the document at that position of the endless sequence of epochs (shuffled
    with `seed`; with seed None, file order and one epoch)."""

    def __init__(self, data: TaskData, seed: int | None):
        self.name = data.name
        self._records = grain.sources.ArrayRecordDataSource(list(data.paths))
        self.num_documents = len(self._records)
        if self.num_documents == 0:
            raise DataError(f"task {data.name!r}: no documents in {', '.join(data.paths)}")
        self._dtype = np.dtype(data.dtype).newbyteorder("<")
        self._masked = data.masked
        self._seed = seed
        # Epoch -> its permutation, while a data shard reads that epoch (each shard holds its own).
        self._permutations = weakref.WeakValueDictionary()

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of documents in `epoch` (explicit permutations only)."""
        order = self._permutations.get(epoch)
        if order is None:
            order = np.random.default_rng([self._seed, epoch]).permutation(self.num_documents).astype(np.int32)
            self._permutations[epoch] = order
        return order

    def document_index(self, epoch: int, k: int, permutation: np.ndarray | None) -> int:
        """The file-order index of the k-th document of `epoch`."""
        if self._seed is None:
            return k
        if permutation is not None:
            return int(permutation[k])
        from grain._src.python.experimental.index_shuffle.python.index_shuffle_module import index_shuffle

        return index_shuffle(k, max_index=self.num_documents - 1, seed=(self._seed + epoch) % 2**32, rounds=4)

    def uses_permutations(self) -> bool:
        return self._seed is not None and self.num_documents <= _PERMUTATION_LIMIT

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(token ids, loss mask; None where every token is trained)."""
        return shards.decode_record(self._records[index], self._dtype, self._masked)


class TaskDocuments(grain.IterDataset):
    """Data shard `shard_index` of `shard_count` of a task's documents (see the module doc): endless
    when `repeat`, else one pass.

    This stands for `MapDataset.source(...).shuffle().repeat()[i::n].to_iter_dataset()`, read on the
    calling thread (the whole pipeline already runs in a prefetch thread): for records this small (one
    document, microseconds to read) grain's per-record layers and read thread pool cost several times
    the read itself, and its index_shuffle takes 0.5 ms a call on small tasks."""

    def __init__(self, source: TaskSource, *, shard_index: int, shard_count: int, repeat: bool):
        super().__init__()
        self.source, self.shard_index, self.shard_count, self.repeat = source, shard_index, shard_count, repeat

    def __iter__(self):
        return _TaskDocumentsIterator(self.source, shard_index=self.shard_index, shard_count=self.shard_count,
                                      repeat=self.repeat)


class _TaskDocumentsIterator(grain.DatasetIterator):
    """State: {"next_index": documents this shard has read}."""

    def __init__(self, source: TaskSource, *, shard_index, shard_count, repeat):
        super().__init__()
        self._source, self._shard_index, self._shard_count, self._repeat = source, shard_index, shard_count, repeat
        self._documents_read = 0
        self._epoch, self._permutation = -1, None  # the permutation of the epoch being read

    def __next__(self):
        position = self._shard_index + self._documents_read * self._shard_count
        epoch, k = divmod(position, self._source.num_documents)
        if epoch and not self._repeat:
            raise StopIteration
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = self._source.permutation(epoch) if self._source.uses_permutations() else None
        document = self._source.read(self._source.document_index(epoch, k, self._permutation))
        self._documents_read += 1
        return document

    def get_state(self):
        return {"next_index": self._documents_read}

    def set_state(self, state):
        self._documents_read = state["next_index"]


class TokenShareMix(grain.IterDataset):
    """Yields (task index, (token ids, loss mask or None)) from its parents so that each task's token count
    tracks its share. Finite: a task that ends stops being drawn from, and the mix ends with the last one."""

    def __init__(self, parents, shares, finite: bool = False):
        super().__init__(list(parents))
        self.shares, self.finite = tuple(float(s) for s in shares), finite

    def __iter__(self):
        return _TokenShareMixIterator([iter(p) for p in self._parents], self.shares, self.finite)


class _TokenShareMixIterator(grain.DatasetIterator):
    """State: {"parents": each task's state, "emitted": tokens drawn per task, "exhausted": ended per task}."""

    def __init__(self, tasks, shares, finite):
        super().__init__(tasks)
        self._tasks, self._shares, self._finite = tasks, shares, finite
        self._tokens_emitted = [0] * len(tasks)
        self._ended = [False] * len(tasks)

    def __next__(self):
        while True:
            live = [i for i in range(len(self._tasks)) if not self._ended[i]]
            if not live:
                raise StopIteration
            furthest_below = min(live, key=lambda i: self._tokens_emitted[i] / self._shares[i])
            try:
                document = next(self._tasks[furthest_below])
            except StopIteration:
                if not self._finite:
                    raise
                self._ended[furthest_below] = True
                continue
            self._tokens_emitted[furthest_below] += len(document[0])
            return furthest_below, document

    def get_state(self):
        return {"parents": [task.get_state() for task in self._tasks], "emitted": list(self._tokens_emitted),
                "exhausted": list(self._ended)}

    def set_state(self, state):
        for task, task_state in zip(self._tasks, state["parents"]):
            task.set_state(task_state)
        self._tokens_emitted = list(state["emitted"])
        self._ended = list(state["exhausted"])


class ConcatPacking(grain.IterDataset):
    """Rows of documents concatenated and cut (see the module doc), from (task, token ids) pairs."""

    def __init__(self, documents, *, seq_len: int, eos_id: int, task_ids: bool, finite: bool):
        super().__init__(documents)
        self.seq_len, self.eos_id, self.task_ids, self.finite = seq_len, eos_id, task_ids, finite

    def __iter__(self):
        return _ConcatPackingIterator(iter(self._parent), seq_len=self.seq_len, eos_id=self.eos_id,
                                      task_ids=self.task_ids, finite=self.finite)


class _ConcatPackingIterator(grain.DatasetIterator):
    """State: {"doc_state": the documents' state before the current document, "has_doc": whether one
    was read, "offset": how many of its tokens were emitted as targets, "carry": the last target (the
    next row's first input token), "done": the stream ended}."""

    def __init__(self, documents, *, seq_len, eos_id, task_ids, finite):
        super().__init__(documents)
        self._documents, self._seq_len, self._task_ids, self._finite = documents, seq_len, task_ids, finite
        self._state_before_document = documents.get_state()
        self._document, self._document_mask, self._document_task, self._targets_taken = None, None, -1, 0
        self._next_input = eos_id  # the stream starts as if after a document
        self._ended = False

    def _read_document(self):
        self._state_before_document = self._documents.get_state()
        self._document_task, (self._document, self._document_mask) = next(self._documents)
        self._targets_taken = 0

    def __next__(self):
        if self._ended:
            raise StopIteration
        T = self._seq_len
        row = padding(T, self._task_ids)
        targets, n = row["targets"], 0
        while n < T:
            if self._document is None or self._targets_taken >= len(self._document):
                try:
                    self._read_document()
                except StopIteration:
                    self._ended = True
                    if not self._finite or n == 0:
                        raise
                    break  # a finite stream's last row, shorter: the rest is padding
            k = min(T - n, len(self._document) - self._targets_taken)
            targets[n:n + k] = self._document[self._targets_taken:self._targets_taken + k]
            mask = self._document_mask
            row["loss_weights"][n:n + k] = 1.0 if mask is None else mask[self._targets_taken:self._targets_taken + k]
            if self._task_ids:
                row[TASK_IDS][n:n + k] = self._document_task
            n += k
            self._targets_taken += k
        row["tokens"][0] = self._next_input
        row["tokens"][1:n] = targets[:n - 1]
        self._next_input = int(targets[n - 1])
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n, dtype=np.int32)
        return row

    def get_state(self):
        return {"doc_state": self._state_before_document, "has_doc": self._document is not None,
                "offset": self._targets_taken, "carry": self._next_input, "done": self._ended}

    def set_state(self, state):
        self._documents.set_state(state["doc_state"])
        self._state_before_document, self._document = state["doc_state"], None
        if state["has_doc"]:
            self._read_document()
        self._targets_taken, self._next_input, self._ended = state["offset"], state["carry"], state["done"]


class FirstFitPacking(grain.IterDataset):
    """Rows of whole chunks, packed first-fit (see the module doc), from (task, token ids) pairs."""

    def __init__(self, documents, *, seq_len: int, eos_id: int, num_bins: int, task_ids: bool, finite: bool):
        super().__init__(documents)
        self.seq_len, self.eos_id, self.num_bins = seq_len, eos_id, num_bins
        self.task_ids, self.finite = task_ids, finite

    def __iter__(self):
        return _FirstFitPackingIterator(iter(self._parent), seq_len=self.seq_len, eos_id=self.eos_id,
                                        num_bins=self.num_bins, task_ids=self.task_ids, finite=self.finite)


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """A piece of one document, at most seq_len targets, and where it is in the stream."""
    state_before_document: dict  # the documents' state before its document
    index: int                   # which chunk of the document
    task: int
    first_input: int             # the token before it: EOS at a text document's start
    targets: np.ndarray
    weights: np.ndarray | None   # the targets' loss mask (a chat task's), None: all trained


class _FirstFitPackingIterator(grain.DatasetIterator):
    """Packs chunks into windows of `num_bins` rows. A window closes when a chunk fits none of its rows;
    that chunk starts the next window. State: {"doc_state", "chunk"}: where the current window's first
    chunk is (the documents' state before its document, the chunk's index in it), "has_doc": whether
    that document was read, "emitted": how many of the window's rows were handed out, and "exhausted":
    the stream ended. Restoring re-reads and re-packs the window: the same rows."""

    def __init__(self, documents, *, seq_len, eos_id, num_bins, task_ids, finite):
        super().__init__(documents)
        self._documents, self._seq_len, self._eos_id = documents, seq_len, eos_id
        self._num_bins, self._task_ids, self._finite = num_bins, task_ids, finite
        # The document being cut: its chunks from self._next_chunk on are still to be packed.
        self._document, self._document_mask, self._document_task, self._next_chunk = None, None, -1, 0
        self._document_start = eos_id  # the input before the document's first target
        self._state_before_document = documents.get_state()
        self._overflow: _Chunk | None = None  # the chunk that closed the last window: it opens the next one
        self._window: list[dict] = []         # the current window's rows
        self._window_start = (self._state_before_document, 0)  # where its first chunk is
        self._rows_given = 0                  # rows of the window handed out
        self._ended = False

    def _read_chunk(self) -> _Chunk:
        """The next chunk of the stream; StopIteration at its end."""
        T = self._seq_len
        if self._document is None or self._next_chunk * T >= len(self._document):
            self._state_before_document = self._documents.get_state()
            self._load(next(self._documents))
            self._next_chunk = 0
        c, document, mask = self._next_chunk, self._document, self._document_mask
        self._next_chunk += 1
        return _Chunk(self._state_before_document, c, self._document_task,
                      self._document_start if c == 0 else int(document[c * T - 1]), document[c * T:(c + 1) * T],
                      None if mask is None else mask[c * T:(c + 1) * T])

    def _load(self, task_and_document):
        """Makes a document the one being cut, as targets after a first input: a text document follows
        EOS; a conversation (with its mask) starts at its own first token, as transformers trains it."""
        self._document_task, (ids, mask) = task_and_document
        if mask is None:
            self._document, self._document_mask, self._document_start = ids, None, self._eos_id
        else:
            self._document, self._document_mask, self._document_start = ids[1:], mask[1:], int(ids[0])

    def _fill_window(self):
        rows, free = [], []  # each row's chunks, and the room left in it
        first = None
        while True:
            if self._overflow is not None:
                chunk, self._overflow = self._overflow, None
            else:
                try:
                    chunk = self._read_chunk()
                except StopIteration:
                    if not self._finite:
                        raise
                    self._ended = True
                    break
            first = first or chunk
            n = len(chunk.targets)
            fits = next((r for r in range(len(rows)) if free[r] >= n), None)
            if fits is not None:
                rows[fits].append(chunk)
                free[fits] -= n
            elif len(rows) == self._num_bins:
                self._overflow = chunk
                break
            else:
                rows.append([chunk])
                free.append(self._seq_len - n)
        self._window_start = (first.state_before_document, first.index) if first else None
        self._window = [self._render(chunks) for chunks in rows]
        self._rows_given = 0

    def _render(self, chunks) -> dict:
        row = padding(self._seq_len, self._task_ids)
        o = 0
        for segment, chunk in enumerate(chunks, 1):
            n = len(chunk.targets)
            row["targets"][o:o + n] = chunk.targets
            row["tokens"][o] = chunk.first_input
            row["tokens"][o + 1:o + n] = chunk.targets[:-1]
            row["loss_weights"][o:o + n] = 1.0 if chunk.weights is None else chunk.weights
            row["segment_ids"][o:o + n] = segment
            row["positions"][o:o + n] = np.arange(n, dtype=np.int32)
            if self._task_ids:
                row[TASK_IDS][o:o + n] = chunk.task
            o += n
        return row

    def __next__(self):
        if self._rows_given >= len(self._window):
            if self._ended:
                raise StopIteration
            self._fill_window()
            if not self._window:
                raise StopIteration
        self._rows_given += 1
        return self._window[self._rows_given - 1]

    def get_state(self):
        if self._rows_given < len(self._window):  # mid-window: re-pack it from its first chunk
            state_before, chunk = self._window_start
            return {"doc_state": state_before, "chunk": chunk, "has_doc": True, "emitted": self._rows_given,
                    "exhausted": False}
        # The next row opens a new window, with the overflowed chunk or the current document's next one.
        if self._overflow is not None:
            state_before, chunk = self._overflow.state_before_document, self._overflow.index
        else:
            state_before, chunk = self._state_before_document, self._next_chunk if self._document is not None else 0
        return {"doc_state": state_before, "chunk": chunk,
                "has_doc": self._document is not None or self._overflow is not None, "emitted": 0,
                "exhausted": self._ended}

    def set_state(self, state):
        self._documents.set_state(state["doc_state"])
        self._state_before_document = state["doc_state"]
        self._document, self._overflow, self._window, self._rows_given = None, None, [], 0
        self._ended = state["exhausted"]
        if self._ended:
            return
        if state["has_doc"]:
            self._load(next(self._documents))
            self._next_chunk = state["chunk"]
        if state["emitted"]:
            self._fill_window()
            self._rows_given = state["emitted"]


class ShardRows(grain.IterDataset):
    """Batches of consecutive data shards' rows side by side: shard `first`'s rows_per_shard rows, then
    the next one's.

    State: {"shard_count": n, "shards": {"<shard index>": that shard's state}}, every shard named, so
    the states of processes holding other shards merge into one (phi_jax.checkpoint does, on restore)
    and any process can take its own shards from it: a run resumes on more or fewer processes.
    Finite shards that end before the others give rows of padding until all have ended."""

    def __init__(self, shards_rows, *, first: int, count: int, rows_per_shard: int, seq_len: int,
                 task_ids: bool, finite: bool):
        super().__init__(list(shards_rows))
        self.first, self.count, self.rows_per_shard = first, count, rows_per_shard
        self.seq_len, self.task_ids, self.finite = seq_len, task_ids, finite

    def __iter__(self):
        return _ShardRowsIterator([iter(p) for p in self._parents], first=self.first, count=self.count,
                                  rows_per_shard=self.rows_per_shard, seq_len=self.seq_len,
                                  task_ids=self.task_ids, finite=self.finite)


class _ShardRowsIterator(grain.DatasetIterator):
    def __init__(self, shards_rows, *, first, count, rows_per_shard, seq_len, task_ids, finite):
        super().__init__(shards_rows)
        self._shards, self._first, self._count = shards_rows, first, count
        self._rows_per_shard, self._seq_len, self._task_ids, self._finite = rows_per_shard, seq_len, task_ids, finite
        self._ended = [False] * len(shards_rows)

    def __next__(self):
        batch = padding((len(self._shards) * self._rows_per_shard, self._seq_len), self._task_ids)
        rows_read = 0
        for i, shard in enumerate(self._shards):
            for r in range(i * self._rows_per_shard, (i + 1) * self._rows_per_shard):
                if self._ended[i]:
                    break
                try:
                    row = next(shard)
                except StopIteration:
                    if not self._finite:
                        raise
                    self._ended[i] = True
                    break
                for name, value in row.items():
                    batch[name][r] = value
                rows_read += 1
        if not rows_read:
            raise StopIteration
        return batch

    def get_state(self):
        return {"shard_count": self._count,
                "shards": {str(self._first + i): shard.get_state() for i, shard in enumerate(self._shards)}}

    def set_state(self, state):
        if "shards" not in state and len(self._shards) == 1:
            # Saved before streams named their shards (one per process then): that process's own shard.
            state = {"shard_count": self._count, "shards": {str(self._first): state}}
        if state.get("shard_count") != self._count:
            found = state.get("shard_count")
            raise DataError(f"the saved data position is of a stream split into {found} data shards, this one "
                            f"into {self._count}: resume with {found} (phi-jax train: "
                            f"--gin_bindings=TrainConfig.data_shards={found})")
        for i, shard in enumerate(self._shards):
            key = str(self._first + i)
            if key not in state["shards"]:
                raise DataError(f"the saved data position has no state for data shard {key} of {self._count} "
                                f"(it has shards {sorted(state['shards'], key=int)})")
            shard.set_state(state["shards"][key])
        self._ended = [False] * len(self._shards)


class Prefetch(grain.IterDataset):
    """Its parent's batches, made up to `buffer_size` ahead on a background thread."""

    def __init__(self, parent, buffer_size: int):
        super().__init__(parent)
        self.buffer_size = buffer_size

    def __iter__(self):
        return _PrefetchIterator(iter(self._parent), self.buffer_size)


# Prefetch threads still running: stopped at exit, before the interpreter tears down the modules and the
# ArrayRecord readers they use (a daemon thread inside a read then aborts the process).
_RUNNING = weakref.WeakSet()


@atexit.register
def _stop_prefetch_threads():
    for iterator in list(_RUNNING):
        iterator.close()


def _make_ahead(batches, buffer: queue.Queue, stop: threading.Event):
    """The prefetch thread: (batch, state after it, None), or (None, None, the exception) at the end."""
    while not stop.is_set():
        try:
            item = (next(batches), batches.get_state(), None)
        except Exception as e:  # StopIteration too: the consumer raises it
            item = (None, None, e)
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if item[2] is not None:
            return


class _PrefetchIterator(grain.DatasetIterator):
    """State: its parent's, after the last batch handed out. The thread starts on the first batch and
    stops on set_state, close and at exit."""

    def __init__(self, batches, buffer_size):
        super().__init__(batches)
        self._batches, self._buffer_size = batches, buffer_size
        self._state_after_last = batches.get_state()
        self._thread, self._buffer, self._stop = None, None, None

    def _start(self):
        self._buffer, self._stop = queue.Queue(self._buffer_size), threading.Event()
        self._thread = threading.Thread(target=_make_ahead, args=(self._batches, self._buffer, self._stop),
                                        daemon=True, name="phi-jax-data-prefetch")
        _RUNNING.add(self)
        self._thread.start()

    def _halt(self):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._buffer, self._stop = None, None, None
        _RUNNING.discard(self)

    def __next__(self):
        if self._thread is None:
            self._start()
        batch, state, error = self._buffer.get()
        if error is not None:
            self._halt()
            raise error
        self._state_after_last = state
        return batch

    def get_state(self):
        return copy.deepcopy(self._state_after_last)

    def set_state(self, state):
        self._halt()
        self._batches.set_state(state)
        self._state_after_last = copy.deepcopy(state)

    def close(self):
        self._halt()
        super().close()


def build(mixture: str, root, *, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
          shard_count: int = 1, local_shards: int = 1, packing: str = "concat", split: str = "train",
          train: bool = True, num_bins: int | None = None, task_ids: bool = False, prefetch: int = 2):
    """(grain IterDataset of batches, [TaskData]) for a mixture prepared under `root` (its shares and
    tokenizer from root/mixtures/<mixture>.json): `local_shards` data shards from `shard_index` (of
    `shard_count`), batch_size // local_shards rows each, side by side (ShardRows)."""
    if packing not in ("concat", "first_fit"):
        raise DataError(f"packing must be 'concat' or 'first_fit', got {packing!r}")
    if not 0 <= shard_index < shard_index + local_shards <= shard_count:
        raise DataError(f"data shards {shard_index}..{shard_index + local_shards - 1} are not all in "
                        f"[0, {shard_count})")
    if seq_len < 2 or batch_size < 1 or batch_size % local_shards:
        raise DataError(f"seq_len must be >= 2 and batch_size a positive multiple of local_shards "
                        f"({local_shards}), got {seq_len} and {batch_size}")
    prepared = shards.read_mixture(root, mixture)
    shares = prepared["shares"]
    tasks = [load_task(root, name, split, mixture) for name in shares]
    _check_tokenizer(mixture, root, prepared["tokenizer"], tasks)
    sources = [TaskSource(t, seed=task_seed(seed, t.name) if train else None) for t in tasks]
    rows_per_shard = batch_size // local_shards
    shard_streams = []
    for index in range(shard_index, shard_index + local_shards):
        documents = [TaskDocuments(s, shard_index=index, shard_count=shard_count, repeat=train) for s in sources]
        mixed = TokenShareMix(documents, [shares[t.name] for t in tasks], finite=not train)
        if packing == "concat":
            rows = ConcatPacking(mixed, seq_len=seq_len, eos_id=tasks[0].eos_id, task_ids=task_ids, finite=not train)
        else:
            rows = FirstFitPacking(mixed, seq_len=seq_len, eos_id=tasks[0].eos_id,
                                   num_bins=num_bins or max(8, rows_per_shard), task_ids=task_ids, finite=not train)
        shard_streams.append(rows)
    ds = ShardRows(shard_streams, first=shard_index, count=shard_count, rows_per_shard=rows_per_shard,
                   seq_len=seq_len, task_ids=task_ids, finite=not train)
    if prefetch:
        ds = Prefetch(ds, prefetch)
    return ds, tasks


def _check_tokenizer(mixture, root, fingerprint, tasks):
    """The mixture's tasks were all tokenized with the tokenizer it was prepared with, still in root."""
    hint = f"re-run `phi-jax data prepare {mixture} --data_dir DATA_DIR` (the shards of another tokenizer are redone)"
    for task in tasks:
        if task.tokenizer != fingerprint:
            raise DataError(f"mixture {mixture!r}: task {task.name!r} under {root} was tokenized with tokenizer "
                            f"{task.tokenizer}, the mixture was prepared with {fingerprint} "
                            f"({shards.mixture_path(root, mixture)}); {hint}")
    tokenizer_file = pathlib.Path(root) / "tokenizer.json"
    try:
        current = file_fingerprint(tokenizer_file)
    except FileNotFoundError:
        raise DataError(f"mixture {mixture!r}: no {tokenizer_file}; {hint}") from None
    if current != fingerprint:
        raise DataError(f"mixture {mixture!r}: {tokenizer_file} (fingerprint {current}) is not the tokenizer it "
                        f"was prepared with ({fingerprint}, {shards.mixture_path(root, mixture)}): another "
                        f"preparation replaced it; {hint}")
