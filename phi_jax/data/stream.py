"""The training stream: grain over prepared ArrayRecord shards. No TensorFlow, no seqio.

Per task: the documents of all its shard files (grain's ArrayRecordDataSource), split between data
shards by document (shard_index, shard_index + shard_count, ...: disjoint, together the whole
source), shuffled with a per-task seed and repeated with a new permutation each epoch. Then:

  mix    TokenShareMix: always draws from the task furthest below its token share (tokens emitted /
         share is smallest), so shares hold to within one document at every step, whatever the
         document lengths, with no statistics needed and nothing random to drift.
  pack   "concat": documents (each ending in EOS) are concatenated and cut into rows, phi's recipe.
           The stream is read as EOS, doc1, EOS, doc2, EOS, ...: row k has tokens[i] = s[kT + i] and
           targets[i] = s[kT + i + 1], so every token is a target exactly once; segment_ids are all 1
           and positions 0..T-1 (attention crosses documents, as phi was trained).
         "first_fit": documents are chunked to at most T targets, and chunks are placed first-fit into
           a window of `num_bins` rows; each chunk is a segment (ids 1, 2, ... in its row) whose
           tokens are [previous token, or EOS at a document start] + chunk[:-1], targets the chunk,
           positions 0..len-1. Padding has segment 0, weight 0, token 0.
  batch  [batch_size, seq_len] numpy arrays, thread-prefetched.

Every stage's iterator state is a small JSON dict (per-task read positions, tokens emitted per task,
and where in the current document / packing window the next row starts), so the next batch after
`set_state` is identical. The state depends on the pipeline's arguments: restore with the same ones.
"""

import dataclasses
import hashlib

import grain
import numpy as np

from phi_jax.data import shards
from phi_jax.data.registry import DataError, mixture_shares

KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class TaskData:
    name: str
    paths: tuple[str, ...]
    dtype: str
    docs: int
    tokens: int
    eos_id: int
    vocab_size: int
    tokenizer: str


def load_task(root, task: str, split: str, mixture: str = "") -> TaskData:
    stats = shards.read_split(root, task, split, mixture)
    s0 = stats[0]
    return TaskData(task, tuple(s["path"] for s in stats), s0["dtype"], sum(s["docs"] for s in stats),
                    sum(s["tokens"] for s in stats), s0["eos_id"], s0["vocab_size"], s0["tokenizer"])


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:4], "little")


# Up to this many documents per data shard, each epoch's order is an explicit permutation (4 bytes a
# document); above, grain's stateless index_shuffle (about 10 us a call, but 0.5 ms on tiny domains).
_PERMUTATION_LIMIT = 1 << 23


def task_dataset(data: TaskData, *, seed: int, shard_index: int, shard_count: int, train: bool) -> grain.IterDataset:
    """The documents (token ids, EOS included) of one task's data shard: for training shuffled with a
    per-task seed and repeated with a new order each epoch; else one pass in file order."""
    return _Records(data, seed=_task_seed(seed, data.name) if train else None, shard_index=shard_index,
                    shard_count=shard_count, repeat=train)


class _Records(grain.IterDataset):
    """Documents shard_index, shard_index + shard_count, ... of a task's ArrayRecord shards.

    This stands for `MapDataset.source(...)[i::n].shuffle().repeat().map().to_iter_dataset()`: the
    same records in the same kind of order, read on the calling thread (the whole pipeline already
    runs in a prefetch thread). For records this small (one document, microseconds to read) grain's
    per-record layers and read thread pool cost several times the read itself, and its index_shuffle
    takes 0.5 ms a call on small tasks. State: the next index (epoch = index // documents)."""

    def __init__(self, data: TaskData, *, seed, shard_index, shard_count, repeat):
        super().__init__()
        self._source = grain.sources.ArrayRecordDataSource(list(data.paths))
        self._n = len(range(shard_index, len(self._source), shard_count))
        if self._n == 0:
            raise DataError(f"task {data.name!r}: {len(self._source)} documents cannot be split over "
                            f"{shard_count} data shards")
        self._dtype = np.dtype(data.dtype).newbyteorder("<")
        self._seed, self._shard_index, self._shard_count, self._repeat = seed, shard_index, shard_count, repeat

    def __iter__(self):
        return _RecordsIterator(self)


class _RecordsIterator(grain.DatasetIterator):
    def __init__(self, records: _Records):
        super().__init__()
        self._r, self._next, self._perm_epoch, self._perm = records, 0, -1, None

    def _shuffled(self, epoch: int, k: int) -> int:
        r = self._r
        if r._n > _PERMUTATION_LIMIT:
            from grain._src.python.experimental.index_shuffle.python.index_shuffle_module import index_shuffle

            return index_shuffle(k, max_index=r._n - 1, seed=(r._seed + epoch) % 2**32, rounds=4)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([r._seed, epoch]).permutation(r._n).astype(np.int32)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def __next__(self):
        r = self._r
        epoch, k = divmod(self._next, r._n)
        if epoch and not r._repeat:
            raise StopIteration
        if r._seed is not None:
            k = self._shuffled(epoch, k)
        record = r._source[r._shard_index + k * r._shard_count]
        self._next += 1
        return np.frombuffer(record, r._dtype)

    def get_state(self):
        return {"next_index": self._next}

    def set_state(self, state):
        self._next = state["next_index"]


class TokenShareMix(grain.IterDataset):
    """Yields (task index, token ids) from its parents so that each task's token count tracks its share."""

    def __init__(self, parents, shares, finite: bool = False):
        super().__init__(list(parents))
        self._shares, self._finite = tuple(float(s) for s in shares), finite

    def __iter__(self):
        return _TokenShareMixIterator([iter(p) for p in self._parents], self._shares, self._finite)


class _TokenShareMixIterator(grain.DatasetIterator):
    def __init__(self, parents, shares, finite):
        super().__init__(parents)
        self._shares, self._finite = shares, finite
        self._emitted = [0] * len(parents)
        self._exhausted = [False] * len(parents)

    def __next__(self):
        while True:
            live = [i for i in range(len(self._parents)) if not self._exhausted[i]]
            if not live:
                raise StopIteration
            i = min(live, key=lambda j: self._emitted[j] / self._shares[j])
            try:
                ids = next(self._parents[i])
            except StopIteration:
                if not self._finite:
                    raise
                self._exhausted[i] = True
                continue
            self._emitted[i] += len(ids)
            return i, ids

    def get_state(self):
        return {"parents": [p.get_state() for p in self._parents], "emitted": list(self._emitted),
                "exhausted": list(self._exhausted)}

    def set_state(self, state):
        for p, s in zip(self._parents, state["parents"]):
            p.set_state(s)
        self._emitted = list(state["emitted"])
        self._exhausted = list(state["exhausted"])


class _Packer(grain.IterDataset):
    def __init__(self, parent, *, seq_len: int, eos_id: int, mode: str, num_bins: int, task_ids: bool,
                 finite: bool):
        super().__init__(parent)
        self._kw = dict(seq_len=seq_len, eos_id=eos_id, task_ids=task_ids, finite=finite)
        self._mode, self._num_bins = mode, num_bins

    def __iter__(self):
        if self._mode == "concat":
            return _ConcatIterator(iter(self._parent), **self._kw)
        return _FirstFitIterator(iter(self._parent), num_bins=self._num_bins, **self._kw)


def _empty_row(seq_len: int, task_ids: bool) -> dict:
    row = {k: np.zeros(seq_len, np.float32 if k == "loss_weights" else np.int32) for k in KEYS}
    if task_ids:
        row["task_ids"] = np.full(seq_len, -1, np.int32)
    return row


class _ConcatIterator(grain.DatasetIterator):
    """Concatenate-and-split. State: the parent's state before the current document, how many of its
    tokens were emitted as targets, and the last target (the next row's first input token)."""

    def __init__(self, parent, *, seq_len, eos_id, task_ids, finite):
        super().__init__(parent)
        self._T, self._eos, self._task_ids, self._finite = seq_len, eos_id, task_ids, finite
        self._doc_state = parent.get_state()
        self._doc, self._task, self._offset, self._carry = None, -1, 0, eos_id
        self._done = False

    def _read(self):
        self._doc_state = self._parent.get_state()
        self._task, self._doc = next(self._parent)
        self._offset = 0

    def __next__(self):
        if self._done:
            raise StopIteration
        T = self._T
        row = _empty_row(T, self._task_ids)
        targets = row["targets"]
        n = 0
        while n < T:
            if self._doc is None or self._offset >= len(self._doc):
                try:
                    self._read()
                except StopIteration:
                    if not self._finite or n == 0:
                        self._done = True
                        raise
                    self._done = True
                    break
            k = min(T - n, len(self._doc) - self._offset)
            targets[n:n + k] = self._doc[self._offset:self._offset + k]
            if self._task_ids:
                row["task_ids"][n:n + k] = self._task
            n += k
            self._offset += k
        row["tokens"][0] = self._carry
        row["tokens"][1:n] = targets[:n - 1]
        self._carry = int(targets[n - 1])
        row["loss_weights"][:n] = 1.0
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n, dtype=np.int32)
        return row

    def get_state(self):
        return {"doc_state": self._doc_state, "has_doc": self._doc is not None, "offset": self._offset,
                "carry": self._carry, "done": self._done}

    def set_state(self, state):
        self._parent.set_state(state["doc_state"])
        self._doc, self._offset = None, 0
        if state["has_doc"]:
            self._read()
        self._offset, self._carry, self._done = state["offset"], state["carry"], state["done"]


class _FirstFitIterator(grain.DatasetIterator):
    """First-fit packing of chunks into windows of `num_bins` rows. A window closes when a chunk fits
    none of its rows; that chunk starts the next window. State: where the current window's first chunk
    is (the parent's state before its document, and the chunk's index in it) and how many of the
    window's rows were already emitted. Restoring re-reads and re-packs the window: same rows."""

    def __init__(self, parent, *, seq_len, eos_id, num_bins, task_ids, finite):
        super().__init__(parent)
        self._T, self._eos, self._bins, self._task_ids, self._finite = seq_len, eos_id, num_bins, task_ids, finite
        self._doc, self._doc_state, self._task, self._chunk = None, parent.get_state(), -1, 0
        self._pending = None  # (position, chunk) that overflowed the last window
        self._window, self._window_pos, self._emitted = [], (self._doc_state, 0), 0
        self._exhausted = False

    def _next_chunk(self):
        """((doc_state, chunk index), (task, tokens, targets)) of the next chunk; StopIteration at the end."""
        if self._doc is None or self._chunk * self._T >= len(self._doc):
            self._doc_state = self._parent.get_state()
            self._task, self._doc = next(self._parent)
            self._chunk = 0
        c, T, doc = self._chunk, self._T, self._doc
        targets = doc[c * T:(c + 1) * T]
        first = self._eos if c == 0 else doc[c * T - 1]
        self._chunk += 1
        return (self._doc_state, c), (self._task, first, targets)

    def _fill_window(self):
        bins, free = [], []
        self._window_pos = self._pending[0] if self._pending else None
        while True:
            if self._pending is not None:
                pos, chunk = self._pending
                self._pending = None
            else:
                try:
                    pos, chunk = self._next_chunk()
                except StopIteration:
                    if not self._finite:
                        raise
                    self._exhausted = True
                    break
            if self._window_pos is None:
                self._window_pos = pos
            n = len(chunk[2])
            for b in range(len(bins)):
                if free[b] >= n:
                    bins[b].append(chunk)
                    free[b] -= n
                    break
            else:
                if len(bins) == self._bins:
                    self._pending = (pos, chunk)
                    break
                bins.append([chunk])
                free.append(self._T - n)
        self._window = [self._render(b) for b in bins]
        self._emitted = 0

    def _render(self, chunks):
        row = _empty_row(self._T, self._task_ids)
        o = 0
        for seg, (task, first, targets) in enumerate(chunks, 1):
            n = len(targets)
            row["targets"][o:o + n] = targets
            row["tokens"][o] = first
            row["tokens"][o + 1:o + n] = targets[:-1]
            row["loss_weights"][o:o + n] = 1.0
            row["segment_ids"][o:o + n] = seg
            row["positions"][o:o + n] = np.arange(n, dtype=np.int32)
            if self._task_ids:
                row["task_ids"][o:o + n] = task
            o += n
        return row

    def __next__(self):
        if self._emitted >= len(self._window):
            if self._exhausted:
                raise StopIteration
            self._fill_window()
            if not self._window:
                raise StopIteration
        self._emitted += 1
        return self._window[self._emitted - 1]

    def get_state(self):
        if self._emitted >= len(self._window):  # the next row starts a new window
            pos = self._pending[0] if self._pending else (self._doc_state, self._chunk) if self._doc is not None \
                else (self._doc_state, 0)
            return {"doc_state": pos[0], "chunk": pos[1], "has_doc": self._doc is not None or self._pending is not None,
                    "emitted": 0, "exhausted": self._exhausted}
        return {"doc_state": self._window_pos[0], "chunk": self._window_pos[1], "has_doc": True,
                "emitted": self._emitted, "exhausted": False}

    def set_state(self, state):
        self._parent.set_state(state["doc_state"])
        self._doc, self._pending, self._window, self._emitted = None, None, [], 0
        self._exhausted = state["exhausted"]
        if self._exhausted:
            return
        if state["has_doc"]:
            self._doc_state = state["doc_state"]
            self._task, self._doc = next(self._parent)
            self._chunk = state["chunk"]
        if state["emitted"]:
            self._fill_window()
            self._emitted = state["emitted"]


class _PadBatch(grain.transforms.Map):
    """The last batch of a finite stream, padded with empty rows (weight 0) to the full batch size."""

    def __init__(self, batch_size: int):
        self._b = batch_size

    def map(self, batch: dict) -> dict:
        n = len(batch["tokens"])
        if n == self._b:
            return batch
        pad = {k: np.zeros((self._b - n,) + v.shape[1:], v.dtype) for k, v in batch.items()}
        if "task_ids" in pad:
            pad["task_ids"][:] = -1
        return {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}


class ShardRows(grain.IterDataset):
    """Batches of consecutive data shards side by side: shard `first`'s rows, then the next one's.

    State: {"shard_count": n, "shards": {"<shard index>": that shard's state}}, every shard named, so
    the states of processes holding other shards merge into one (phi_jax.checkpoint does, on restore)
    and any process can take its own shards from it: a run resumes on more or fewer processes.
    Finite shards that end before the others give rows of padding until all have ended."""

    def __init__(self, parents, *, first: int, count: int, rows: int, finite: bool):
        super().__init__(list(parents))
        self._first, self._count, self._rows, self._finite = first, count, rows, finite

    def __iter__(self):
        return _ShardRowsIterator([iter(p) for p in self._parents], first=self._first, count=self._count,
                                  rows=self._rows, finite=self._finite)


class _ShardRowsIterator(grain.DatasetIterator):
    def __init__(self, parents, *, first, count, rows, finite):
        super().__init__(parents)
        self._first, self._count, self._rows, self._finite = first, count, rows, finite
        self._ended = [False] * len(parents)

    def __next__(self):
        blocks = []
        for i, parent in enumerate(self._parents):
            if not self._ended[i]:
                try:
                    blocks.append(next(parent))
                    continue
                except StopIteration:
                    if not self._finite:
                        raise
                    self._ended[i] = True
            blocks.append(None)
        if all(self._ended):
            raise StopIteration
        template = next(b for b in blocks if b is not None)
        if None in blocks:
            padding = _PadBatch(self._rows).map({k: v[:0] for k, v in template.items()})
            blocks = [padding if b is None else b for b in blocks]
        return {k: np.concatenate([b[k] for b in blocks]) for k in template}

    def get_state(self):
        return {"shard_count": self._count,
                "shards": {str(self._first + i): p.get_state() for i, p in enumerate(self._parents)}}

    def set_state(self, state):
        if "shards" not in state and len(self._parents) == 1:
            # Saved before streams named their shards (one per process then): that process's own shard.
            state = {"shard_count": self._count, "shards": {str(self._first): state}}
        if state.get("shard_count") != self._count:
            found = state.get("shard_count")
            raise DataError(f"the saved data position is of a stream split into {found} data shards, this one "
                            f"into {self._count}: resume with {found} (phi-jax train: "
                            f"--gin_bindings=TrainConfig.data_shards={found})")
        for i, parent in enumerate(self._parents):
            key = str(self._first + i)
            if key not in state["shards"]:
                raise DataError(f"the saved data position has no state for data shard {key} of {self._count} "
                                f"(it has shards {sorted(state['shards'], key=int)})")
            parent.set_state(state["shards"][key])
        self._ended = [False] * len(self._parents)


def build(mixture: str, root, *, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
          shard_count: int = 1, local_shards: int = 1, packing: str = "concat", split: str = "train",
          train: bool = True, num_bins: int | None = None, task_ids: bool = False, prefetch: int = 2):
    """(grain IterDataset of batches, [TaskData]) for a mixture over prepared shards under `root`:
    `local_shards` data shards from `shard_index` (of `shard_count`), batch_size // local_shards rows
    each, side by side (ShardRows)."""
    if packing not in ("concat", "first_fit"):
        raise DataError(f"packing must be 'concat' or 'first_fit', got {packing!r}")
    if not 0 <= shard_index < shard_index + local_shards <= shard_count:
        raise DataError(f"data shards {shard_index}..{shard_index + local_shards - 1} are not all in "
                        f"[0, {shard_count})")
    if seq_len < 2 or batch_size < 1 or batch_size % local_shards:
        raise DataError(f"seq_len must be >= 2 and batch_size a positive multiple of local_shards "
                        f"({local_shards}), got {seq_len} and {batch_size}")
    shares = mixture_shares(mixture)
    tasks = [load_task(root, name, split, mixture) for name in shares]
    if len({t.tokenizer for t in tasks}) != 1:
        raise DataError(f"mixture {mixture!r}: its tasks under {root} were tokenized with different tokenizers")
    rows = batch_size // local_shards
    shards = []
    for index in range(shard_index, shard_index + local_shards):
        parents = [task_dataset(t, seed=seed, shard_index=index, shard_count=shard_count, train=train)
                   for t in tasks]
        ds = TokenShareMix(parents, [shares[t.name] for t in tasks], finite=not train)
        ds = _Packer(ds, seq_len=seq_len, eos_id=tasks[0].eos_id, mode=packing, num_bins=num_bins or max(8, rows),
                     task_ids=task_ids, finite=not train)
        ds = ds.batch(rows, drop_remainder=train)
        if not train:
            ds = ds.map(_PadBatch(rows))
        shards.append(ds)
    ds = ShardRows(shards, first=shard_index, count=shard_count, rows=rows, finite=not train)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds, tasks
