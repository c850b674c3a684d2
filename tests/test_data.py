"""The data edge: seqio tasks prepared into ArrayRecord shards, the grain stream, phi-jax data.

One small corpus (synthetic / code / web in JSON lines, .gz, Parquet and TFRecord, document lengths
30 / 150 / 600 tokens: 20x apart) is prepared once per test session and shared by the xdist workers.
"""

import contextlib
import fcntl
import gzip
import itertools
import json
import os
import pathlib
import random
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

import data_tasks
from phi_jax import batch as batch_fields
from phi_jax import data
from phi_jax.data import shards, stream, synthetic
from phi_jax.data.registry import DataError
from phi_jax.data.tokenizer import Tokenizer, train_byte_level_bpe

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return class import yield lambda while for if else").split()
# Mean words per document of each source: web documents are 20x shorter than code documents (tokens).
WORDS_PER_DOC = {"web": 12, "synthetic": 60, "code": 260}
SEQ = 64


def _text(rng, source, words):
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return {"code": f"def f():\n    {body}\n", "web": f"{body}.", "synthetic": f"Lesson. {body}!"}[source]


def _docs(source, split, n, seed=0):
    rng = random.Random(f"{source}:{split}:{seed}")
    mean = WORDS_PER_DOC[source]
    return [_text(rng, source, rng.randint(mean // 2, 3 * mean // 2)) for _ in range(n)]


def _write_jsonl(path, docs, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt") if gz else open(path, "w")) as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def _write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)


def _write_tfrecord(path, records):
    """TFRecord framing (CRCs are not checked by our reader, so zeros do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write(struct.pack("<Q", len(r)) + b"\0" * 4 + r + b"\0" * 4)


def _example(text: bytes) -> bytes:
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example()
    ex.features.feature["text"].bytes_list.value.append(text)
    return ex.SerializeToString()


@contextlib.contextmanager
def _shared(tmp_path_factory, name):
    """A directory shared by the xdist workers of this run, built by whoever gets the lock first."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path, (path / "READY").exists()
        (path / "READY").touch()


def make_corpus(root: pathlib.Path):
    _write_jsonl(root / "synthetic/train/part-0.jsonl", _docs("synthetic", "train", 300))
    _write_jsonl(root / "synthetic/train/part-1.jsonl.gz", _docs("synthetic", "train", 300, seed=1), gz=True)
    _write_jsonl(root / "synthetic/validation/part-0.jsonl", _docs("synthetic", "validation", 20))
    _write_parquet(root / "code/train/part-0.parquet", _docs("code", "train", 150))
    _write_parquet(root / "code/validation/part-0.parquet", _docs("code", "validation", 5))
    _write_jsonl(root / "web/train/a.jsonl.gz", _docs("web", "train", 1500), gz=True)
    _write_tfrecord(root / "web/train/b.tfrecord", [_example(d.encode()) for d in _docs("web", "train", 1500, seed=1)])
    _write_jsonl(root / "web/validation/part-0.jsonl", _docs("web", "validation", 100))
    sample = [d for s in WORDS_PER_DOC for d in _docs(s, "train", 50)] + ["!?.,:;()[]{}<>=+-*/\n    "]
    train_byte_level_bpe(sample, 320, root / "tokenizer.json")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """DATA_DIR of the test corpus, prepared (phi15_web = all three tasks)."""
    with _shared(tmp_path_factory, "data_corpus") as (root, ready):
        if not ready:
            make_corpus(root)
            from phi_jax.data.prepare import prepare

            prepare("phi15_web", data_dir=root)
    return root


def _all_docs(root, task, split="train"):
    from array_record.python.array_record_module import ArrayRecordReader

    docs = []
    for s in shards.read_split(shards.prepared_root(root), task, split):
        reader = ArrayRecordReader(s["path"])
        docs += [np.frombuffer(r, s["dtype"]).astype(np.int32) for r in reader.read_all()]
        reader.close()
    return docs


def _shares(mixture, root, n_tokens, **kw):
    ds, tasks = stream.build(mixture, shards.prepared_root(root), task_ids=True, **kw)
    counts, seen = np.zeros(len(tasks)), 0
    for batch in ds:
        w = batch["loss_weights"] > 0
        counts += np.bincount(batch["task_ids"][w], minlength=len(tasks))
        seen += w.sum()
        if seen >= n_tokens:
            return {t.name: c / seen for t, c in zip(tasks, counts)}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# --- the tokenizer and the corpus ------------------------------------------------------------------------


def test_tokenizer_id_zero_is_a_real_token_and_eos_is_last(corpus):
    tok = Tokenizer(corpus / "tokenizer.json")
    assert tok.encode("!") == [0]
    assert tok.eos_id == tok.vocab_size - 1 == 319
    assert tok.decode(tok.encode("def f():\n    return pi")) == "def f():\n    return pi"
    assert data.load_tokenizer(corpus).fingerprint == data.tokenizer_for("phi15_web", corpus).fingerprint


def test_prepared_shards_document_lengths_differ_20x(corpus):
    root = shards.prepared_root(corpus)
    totals = {t: shards.split_totals(root, t) for t in ("web", "code")}
    per_doc = {t: total["tokens"] / total["docs"] for t, total in totals.items()}
    assert per_doc["code"] / per_doc["web"] > 20
    assert shards.split_totals(root, "web")["shards"] == 2  # a.jsonl.gz and b.tfrecord
    assert shards.split_totals(root, "synthetic")["docs"] == 600
    assert shards.split_totals(root, "code")["docs"] == 150  # parquet


def test_synthetic_generator_is_deterministic_and_varied():
    docs = list(synthetic.documents(len(synthetic.TOPICS) * len(synthetic.TEMPLATES) * 3))
    assert docs == list(synthetic.documents(len(docs)))
    assert docs != list(synthetic.documents(len(docs), seed=1))
    assert len(set(docs)) == len(docs)
    assert {d.split("\n")[0][:12] for d in docs} >= {"# Lesson: Ad", "## Worked ex", "## Exercises"}


# --- the stream ------------------------------------------------------------------------------------------


def test_mixture_token_shares_within_one_percent(corpus):
    for packing in ("concat", "first_fit"):
        observed = _shares("phi15_web", corpus, 200_000, seq_len=SEQ, batch_size=16, seed=3, packing=packing)
        for task, share in data_tasks.MIXTURES["phi15_web"].items():
            assert abs(observed[task] - share) < 0.01, (packing, observed)
    observed = _shares("phi1", corpus, 100_000, seq_len=SEQ, batch_size=16, seed=0)
    assert abs(observed["code"] - 6 / 7) < 0.01, observed


def test_batches_shapes_dtypes_and_shift(corpus):
    batch = next(data.make_train_iterator("phi15_web", data_dir=corpus, seq_len=SEQ, batch_size=4, seed=0))
    dtypes = {"tokens": np.int32, "targets": np.int32, "loss_weights": np.float32, "segment_ids": np.int32,
              "positions": np.int32}
    assert batch_fields.FIELDS == dtypes and list(batch) == list(dtypes)  # the one schema, in its order
    for k, v in batch.items():
        assert v.shape == (4, SEQ) and v.dtype == dtypes[k], k
    eos = Tokenizer(corpus / "tokenizer.json").eos_id
    assert batch["tokens"][0, 0] == eos  # the stream starts as if after a document
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["tokens"][1:, 0], batch["targets"][:-1, -1])  # rows continue
    assert (batch["loss_weights"] == 1).all() and (batch["segment_ids"] == 1).all()
    np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(SEQ), (4, SEQ)))


def test_token_zero_gets_loss_weight(corpus):
    """'!' is id 0, as in phi's vocabulary: it is trained on, never treated as padding."""
    batches = _take(data.make_train_iterator("synthetic", data_dir=corpus, seq_len=SEQ, batch_size=8, seed=0), 6)
    zero = np.concatenate([b["loss_weights"][b["targets"] == 0] for b in batches])
    assert zero.size >= 10 and (zero == 1).all()


def test_same_seed_same_batches_other_seed_different(corpus):
    def batches(seed, packing="concat"):
        return _take(data.make_train_iterator("phi15_web", data_dir=corpus, seq_len=SEQ, batch_size=4, seed=seed,
                                              packing=packing), 5)

    assert _same(batches(0), batches(0))
    assert not _same(batches(0), batches(1))
    assert _same(batches(7, "first_fit"), batches(7, "first_fit"))


def _shard_documents(root, task, shard_count, train, n=None):
    """The first n documents (default: one pass) of each of shard_count data shards, as tuples."""
    source = stream.TaskSource(stream.load_task(root, task, "train"), seed=stream.task_seed(0, task) if train else None)
    shards_docs = []
    for index in range(shard_count):
        documents = stream.TaskDocuments(source, shard_index=index, shard_count=shard_count, repeat=train)
        shards_docs.append([tuple(ids) for ids, _ in itertools.islice(documents, n)])  # (ids, loss mask)
    return shards_docs


def test_hosts_read_disjoint_data_covering_the_source(corpus):
    root = shards.prepared_root(corpus)
    everything = sorted(tuple(d) for d in _all_docs(corpus, "synthetic"))
    once = _shard_documents(root, "synthetic", 3, train=False)  # one pass in file order: documents s, s + 3, ...
    assert [len(d) for d in once] == [200, 200, 200] and sorted(sum(once, [])) == everything
    assert once[1] == [tuple(d) for d in _all_docs(corpus, "synthetic")[1::3]]
    # Training: each epoch a permutation of all documents, shard s reading positions s, s + 3, ... of
    # the epochs one after another: within an epoch the shards never meet and together read everything.
    for shard_count in (1, 3, 7):
        epochs = _shard_documents(root, "synthetic", shard_count, train=True, n=2 * 600 // shard_count + 1)
        positions = {}
        for s, docs in enumerate(epochs):
            for j, doc in enumerate(docs):
                positions[s + j * shard_count] = doc
        for epoch in range(2):
            first = [positions[p] for p in range(600 * epoch, 600 * (epoch + 1))]
            assert sorted(first) == everything
        assert [positions[p] for p in range(600)] != [positions[p] for p in range(600, 1200)]  # a new order
        assert [positions[p] for p in range(600)] != [tuple(d) for d in _all_docs(corpus, "synthetic")]
    # More data shards than documents: every shard still reads, across epochs.
    many = _shard_documents(root, "code", 400, train=True, n=3)
    assert all(len(docs) == 3 for docs in many)
    # The full pipeline on two data shards: different batches.
    a, b = (next(data.make_train_iterator("phi15_web", data_dir=corpus, seq_len=SEQ, batch_size=4, seed=0,
                                          shard_index=i, shard_count=2)) for i in range(2))
    assert not np.array_equal(a["targets"], b["targets"])


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_exact_resume_from_state(corpus, packing):
    kw = dict(data_dir=corpus, seq_len=SEQ, batch_size=4, seed=5, packing=packing)
    it = data.make_train_iterator("phi15_web", **kw)
    for k in (3, 1, 7):  # save at several points mid-stream (mid-document, mid-window)
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        assert len(json.dumps(state)) < 2000
        expected = _take(it, 6)
        restored = data.make_train_iterator("phi15_web", **kw)
        restored.set_state(state)
        assert _same(_take(restored, 6), expected)


def test_exact_resume_through_orbax(corpus, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    kw = dict(data_dir=corpus, seq_len=SEQ, batch_size=4, seed=2, packing="first_fit")
    it = data.make_train_iterator("phi15_web", **kw)
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3)}),
                                                data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 4)
    fresh = data.make_train_iterator("phi15_web", **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore({"w": np.arange(3)}),
                                                   data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _same(_take(fresh, 4), expected)


def test_first_fit_never_mixes_documents_in_a_segment(corpus):
    eos = Tokenizer(corpus / "tokenizer.json").eos_id
    chunks = set()
    for task in ("web", "code", "synthetic"):
        for doc in _all_docs(corpus, task):
            for c in range(0, len(doc), SEQ):
                chunks.add((int(eos if c == 0 else doc[c - 1]),) + tuple(doc[c:c + SEQ].tolist()))
    ds, _ = stream.build("phi15_web", shards.prepared_root(corpus), seq_len=SEQ, batch_size=8, seed=1,
                         packing="first_fit", task_ids=True)
    segments = 0
    it = iter(ds)
    for _ in range(10):
        batch = next(it)
        for r in range(8):
            seg, pos, tok, tgt, w, tid = (batch[k][r] for k in ("segment_ids", "positions", "tokens", "targets",
                                                                 "loss_weights", "task_ids"))
            assert ((seg == 0) == (w == 0)).all() and (tok[seg == 0] == 0).all()
            ids = [s for s in np.unique(seg) if s]
            assert ids == list(range(1, len(ids) + 1))
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all()  # contiguous
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                assert len(set(tid[where].tolist())) == 1
                # The segment is one chunk of one document: its first input token, then its targets.
                assert (int(tok[where[0]]),) + tuple(tgt[where].tolist()) in chunks
                np.testing.assert_array_equal(tok[where[1:]], tgt[where[:-1]])
                segments += 1
    assert segments > 80 and (batch["segment_ids"].max(axis=1) > 1).any()


def test_eval_iterator_is_finite_padded_and_covers_every_token(corpus):
    total = sum(shards.split_totals(shards.prepared_root(corpus), t, "validation")["tokens"]
                for t in ("web", "code", "synthetic"))
    for packing in ("concat", "first_fit"):
        batches = list(data.make_eval_iterator("phi15_web", data_dir=corpus, seq_len=SEQ, batch_size=8,
                                               packing=packing))
        assert all(b["tokens"].shape == (8, SEQ) for b in batches)
        assert sum(b["loss_weights"].sum() for b in batches) == total
        assert batches[-1]["loss_weights"][-1].sum() == 0  # the last batch is padded


def test_stream_errors_name_the_path_and_the_task(corpus, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=re.escape(
            f"unknown mixture or task 'phi15_web': not prepared in {tmp_path} (no {tmp_path}/mixtures/phi15_web.json); "
            "prepared there: none; to add it, run `phi-jax data prepare phi15_web --data_dir DATA_DIR`")):
        data.make_train_iterator("phi15_web", data_dir=tmp_path, seq_len=SEQ, batch_size=2, seed=0)
    shards.write_mixture(tmp_path, "phi15_web", data_tasks.MIXTURES["phi15_web"], "f" * 16, "data_tasks")
    with pytest.raises(DataError, match=re.escape(f"task 'web' split 'train': no prepared shards in {tmp_path}")):
        data.make_train_iterator("phi15_web", data_dir=tmp_path, seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(DataError, match="unknown mixture or task 'nope'.*prepared there: code, phi1, phi15, "
                                        "phi15_web, phi15_web_only, synthetic, web"):
        data.make_train_iterator("nope", data_dir=corpus, seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(DataError, match="unknown mixture or task 'phi15_wbe'.*did you mean 'phi15_web'"):
        data.make_train_iterator("phi15_wbe", data_dir=corpus, seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(DataError, match="packing"):
        data.make_train_iterator("web", data_dir=corpus, seq_len=SEQ, batch_size=2, seed=0, packing="best")
    monkeypatch.delenv("PHI_JAX_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=re.escape("mixture 'phi15' needs a DATA_DIR") + ".*PHI_JAX_DATA_DIR"):
        data.make_train_iterator("phi15", data_dir=None, seq_len=SEQ, batch_size=2, seed=0)


def test_the_stream_mixes_the_shares_prepare_recorded(corpus, tmp_path):
    """What a mixture is lives in the prepared directory: prepare wrote it, the stream reads it."""
    root = shards.prepared_root(corpus)
    fingerprint = Tokenizer(root / "tokenizer.json").fingerprint
    assert shards.prepared_mixtures(root) == ["code", "phi1", "phi15", "phi15_web", "phi15_web_only", "synthetic",
                                              "web"]  # phi15_web's tasks make phi1, phi15, phi15_web_only too
    for name in ("phi15_web", "phi1", "web"):
        record = json.loads((root / "mixtures" / f"{name}.json").read_text())
        assert record == {"mixture": name, "shares": data_tasks.MIXTURES.get(name, {name: 1.0}),
                          "tokenizer": fingerprint, "tasks_module": "data_tasks"}
    assert data.mixture_shares("phi15_web", corpus) == data_tasks.MIXTURES["phi15_web"]

    copy = tmp_path / "prepared"
    import shutil

    shutil.copytree(root, copy)
    shards.write_mixture(copy, "mostly_web", {"web": 3, "code": 1}, fingerprint, "someone's module")
    observed = _shares("mostly_web", copy, 100_000, seq_len=SEQ, batch_size=8, seed=0)
    assert abs(observed["web"] - 0.75) < 0.01 and abs(observed["code"] - 0.25) < 0.01, observed

    shards.write_mixture(copy, "other_tokenizer", {"web": 1}, "0" * 16, "data_tasks")
    with pytest.raises(DataError, match=re.escape(f"mixture 'other_tokenizer': task 'web' under {copy} was tokenized "
                                                  f"with tokenizer {fingerprint}, the mixture was prepared with "
                                                  f"{'0' * 16}")):
        data.make_train_iterator("other_tokenizer", data_dir=copy, seq_len=SEQ, batch_size=2, seed=0)
    train_byte_level_bpe(["another vocabulary"], 280, copy / "tokenizer.json")
    with pytest.raises(DataError, match=re.escape(f"mixture 'web': {copy / 'tokenizer.json'} (fingerprint ") +
                       ".*is not the tokenizer it was prepared with.*re-run `phi-jax data prepare web"):
        data.make_train_iterator("web", data_dir=copy, seq_len=SEQ, batch_size=2, seed=0)


def test_a_misspelled_mixture_is_refused_without_tensorflow(corpus):
    """By prepare (from the tasks module's plain-Python MIXTURES) and by the stream (from the prepared
    directory), each naming the closest valid name; neither imports TensorFlow or seqio."""
    code = f"""
import sys
from phi_jax import data
from phi_jax.cli import main
assert main(["data", "prepare", "phi15_wbe", "--data_dir", {str(corpus)!r}]) == 2
try:
    data.make_train_iterator("phi_15", data_dir={str(corpus)!r}, seq_len=8, batch_size=2, seed=0)
except data.DataError as e:
    print("stream:", e)
print("imported:", sorted(m for m in ("tensorflow", "seqio") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("phi-jax data: error: unknown mixture or task 'phi15_wbe' in tasks module 'data_tasks' (did you mean "
            "'phi15_web'?)") in result.stderr
    assert "stream: unknown mixture or task 'phi_15': not prepared in" in result.stdout
    assert "(did you mean 'phi15'?)" in result.stdout
    assert "imported: []" in result.stdout


def test_default_data_shards_give_the_same_batches_on_any_number_of_processes(corpus, tmp_path):
    """TrainConfig.data_shards' default, one shard per row: the global batch that 1, 2 or 4 processes
    read is the same, and a position saved by 2 processes resumes on 4 or on 1."""
    from etils import epath

    from phi_jax.checkpoint import DataHandler, DataRestore
    from phi_jax.trainer import TrainConfig, data_shards_of_rows

    def processes(count, packing):
        config = TrainConfig(mixture="phi15_web", data_dir=str(corpus), batch_size=8, seq_len=SEQ, packing=packing)
        rows = config.batch_size // count
        return [data.make_train_iterator(config.mixture, data_dir=corpus, seq_len=SEQ, batch_size=rows, seed=1,
                                         packing=packing, **data_shards_of_rows(config, p * rows, rows))
                for p in range(count)]

    def global_batches(iterators, steps):
        return [{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
                for batches in ([next(it) for it in iterators] for _ in range(steps))]

    for packing in ("concat", "first_fit"):
        one, two, four = (processes(n, packing) for n in (1, 2, 4))
        expected = global_batches(one, 4)
        assert _same(global_batches(two, 4), expected) and _same(global_batches(four, 4), expected)
        saved = tmp_path / packing
        saved.mkdir()
        for p, it in enumerate(two):
            (saved / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
        expected = global_batches(one, 2)
        for resumed in (processes(4, packing), processes(1, packing)):
            for it in resumed:
                DataHandler().restore(epath.Path(saved), DataRestore(it))
            assert _same(global_batches(resumed, 2), expected)


def test_iterators_left_open_at_exit_end_quietly(corpus):
    """Prefetch threads still running at exit are stopped before the interpreter tears down."""
    code = f"""
from phi_jax import data
kw = dict(data_dir={str(corpus)!r}, seq_len=16, batch_size=2)
train, evaluation = data.make_train_iterator("phi15_web", seed=0, **kw), data.make_eval_iterator("phi15_web", **kw)
next(train), next(evaluation)
print("done")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent.parent)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]


# --- prepare ---------------------------------------------------------------------------------------------


def test_prepare_is_resumable_and_splittable_across_machines(corpus, tmp_path):
    from phi_jax.data.prepare import prepare

    out = tmp_path / "prepared"
    first = [prepare("web", data_dir=corpus, out_dir=out, shard_index=i, num_shards=2) for i in range(2)]
    assert [r["done"] for r in first] == [2, 1]  # 3 input files (2 train, 1 validation) over two machines
    again = prepare("web", data_dir=corpus, out_dir=out)
    assert again["done"] == 0 and again["skipped_done"] == 3
    victim = next(out.glob("web/train/*.json"))
    victim.unlink()
    assert prepare("web", data_dir=corpus, out_dir=out)["done"] == 1
    reference = shards.prepared_root(corpus)
    assert shards.split_totals(out, "web") == shards.split_totals(reference, "web")


def test_hosts_preparing_into_one_directory_do_not_take_each_others_files(corpus, tmp_path, monkeypatch):
    """Host 1 runs a whole preparation between host 0's copy of the tokenizer and its rename into
    place: with a temporary name they share, host 0 then finds its file gone."""
    import shutil

    from phi_jax.data.prepare import prepare

    out = tmp_path / "prepared"
    copyfile, other_host = shutil.copyfile, []

    def copy_then_other_host_prepares(src, dst, **kwargs):
        copied = copyfile(src, dst, **kwargs)
        if pathlib.Path(dst).parent == out and not other_host:
            other_host.append(None)  # host 1's own copy must not start a third host
            other_host[0] = prepare("web", data_dir=corpus, out_dir=out, splits=("validation",), shard_index=1,
                                    num_shards=2)
        return copied

    monkeypatch.setattr(shutil, "copyfile", copy_then_other_host_prepares)
    mine = prepare("web", data_dir=corpus, out_dir=out, splits=("validation",), shard_index=0, num_shards=2)
    assert mine["done"] == 1 and other_host[0]["done"] == 0
    assert (out / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()
    assert sorted(os.listdir(out)) == ["mixtures", "tokenizer.json", "web"]  # no temporary file left behind
    assert os.listdir(out / "mixtures") == ["web.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from phi_jax.files import replacing

    target = tmp_path / "tokenizer.json"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["tokenizer.json"]


@pytest.mark.slow
def test_prepare_in_parallel_processes_matches_one_process(tmp_path, monkeypatch):
    """The spawned workers import the tasks module themselves: here one only on this process's sys.path."""
    from phi_jax.data.prepare import prepare

    root = _team(tmp_path, monkeypatch)
    one = prepare("notes_and_web", data_dir=root, out_dir=tmp_path / "one", tasks_module="my_team_tasks")
    two = prepare("notes_and_web", data_dir=root, out_dir=tmp_path / "two", workers=2, tasks_module="my_team_tasks")
    assert one["done"] == two["done"] == 6
    for task in ("notes", "web"):
        for split in ("train", "validation"):
            ours, reference = (shards.read_split(tmp_path / out, task, split) for out in ("two", "one"))
            assert [(s["docs"], s["tokens"], s["tokenizer"]) for s in ours] == \
                   [(s["docs"], s["tokens"], s["tokenizer"]) for s in reference]
        np.testing.assert_array_equal(np.concatenate(_all_docs(tmp_path / "two", task)),
                                      np.concatenate(_all_docs(tmp_path / "one", task)))
    assert (shards.read_mixture(tmp_path / "two", "notes_and_web")
            == shards.read_mixture(tmp_path / "one", "notes_and_web"))


def _bad_corpus(root):
    web = root / "web" / "train"
    web.mkdir(parents=True)
    lines = [b'{"text": "good one"}', b'{"text": broken', b'{"text": "caf\xe9 latin-1"}', b'{"text": "   "}',
             b'{"title": "no text"}', b"", b'{"text": "good two"}', b'["not", "an", "object"]', b'{"text": 5}']
    (web / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    _write_tfrecord(web / "b.tfrecord", [_example(b"good three"), b"\x01garbage", _example(b"\xff\xfe")])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", "y"]}), web / "c.parquet")
    pq.write_table(pa.table({"text": ["good four", "", None]}), web / "d.parquet")
    (root / "web" / "validation").mkdir()
    (root / "web" / "validation" / "v.jsonl.gz").write_bytes(gzip.compress(b'{"text": "valid"}\n'))
    train_byte_level_bpe(["good one two three four valid"], 300, root / "tokenizer.json")


def test_bad_records_are_skipped_counted_and_reported_with_positions(tmp_path, caplog):
    from phi_jax.data.prepare import prepare

    _bad_corpus(tmp_path)
    result = prepare("web", data_dir=tmp_path)
    report = result["report"]
    assert dict(report.counts) == {"malformed JSON": 1, "invalid UTF-8": 2, "empty document": 2,
                                   "no text field": 6, "malformed record": 1}
    text = caplog.text
    web = tmp_path / "web" / "train"
    for where in (f"{web}/a.jsonl:2 (malformed JSON)", f"{web}/a.jsonl:3 (invalid UTF-8)",
                  f"{web}/a.jsonl:4 (empty document)", f"{web}/a.jsonl:5 (no text field)",
                  f"{web}/b.tfrecord:record 2 (malformed record)", f"{web}/c.parquet:row 1 (no text field)",
                  f"{web}/d.parquet:row 3 (no text field)"):
        assert where in text, where
    assert "bad input: skipped 12 records" in text  # the summary at the end
    assert shards.split_totals(tmp_path / "prepared", "web")["docs"] == 4  # good one..four
    # Reported again on a resumed run that redoes nothing: never forgotten.
    caplog.clear()
    assert prepare("web", data_dir=tmp_path)["report"].total == 12
    assert "bad input: skipped 12 records" in caplog.text


def test_each_data_dir_is_tokenized_with_its_own_tokenizer(corpus, tmp_path):
    """One process preparing two DATA_DIRs in turn (the seqio vocabulary must not keep the first)."""
    from phi_jax.data.prepare import prepare

    prepare("web", data_dir=corpus, out_dir=tmp_path / "first", splits=("validation",))
    _bad_corpus(tmp_path / "bad")
    prepare("web", data_dir=tmp_path / "bad", splits=("validation",))
    tok = Tokenizer(tmp_path / "bad" / "tokenizer.json")
    (stats,) = shards.read_split(tmp_path / "bad" / "prepared", "web", "validation")
    assert stats["tokenizer"] == tok.fingerprint != Tokenizer(corpus / "tokenizer.json").fingerprint
    (doc,) = _all_docs(tmp_path / "bad", "web", "validation")
    assert tok.decode(doc.tolist()) == "valid<|endoftext|>"


def test_missing_data_dir_and_empty_split_name_path_and_task(tmp_path):
    from phi_jax.data.prepare import prepare

    with pytest.raises(DataError, match=re.escape(f"task 'code': DATA_DIR {tmp_path}/nowhere does not exist")):
        prepare("code", data_dir=tmp_path / "nowhere", tokenizer=_tiny_tokenizer(tmp_path))
    (tmp_path / "code" / "train").mkdir(parents=True)
    (tmp_path / "code" / "train" / "README.md").write_text("not data")
    with pytest.raises(DataError, match=re.escape(f"task 'code': {tmp_path}/code/train is empty")):
        prepare("code", data_dir=tmp_path, tokenizer=_tiny_tokenizer(tmp_path))
    with pytest.raises(DataError, match=re.escape(f"task 'code': {tmp_path}/code/validation does not exist")):
        prepare("code", data_dir=tmp_path, tokenizer=_tiny_tokenizer(tmp_path), splits=("validation",))
    with pytest.raises(DataError, match="no tokenizer at"):
        prepare("code", data_dir=tmp_path, tokenizer=str(tmp_path / "none.json"))


def _tiny_tokenizer(tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    if not path.exists():
        train_byte_level_bpe(["tiny"], 280, path)
    return str(path)


def test_seqio_mixture_rates_convert_token_shares_through_statistics(corpus):
    """For seqio's own users; phi-jax's stream reads the shares `prepare` recorded, never these rates."""
    import seqio

    data_tasks.register(corpus)
    mixture = seqio.get_mixture_or_task("phi15_web")
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    root = shards.prepared_root(corpus)
    for name, share in data_tasks.MIXTURES["phi15_web"].items():
        totals = shards.split_totals(root, name)
        # rate x tokens per document is the token share
        assert rates[name] * totals["tokens"] / totals["docs"] == pytest.approx(share)


TEAM_TASKS = '''"""A team's own tasks module: shouted notes, mixed with phi's web task."""

MIXTURES = {"notes_and_web": {"notes": 0.75, "web": 0.25}}


def register(data_dir, tokenizer):
    import tensorflow as tf

    from data_tasks import seqio_tasks
    from data_tasks.vocab import HFTokenizerVocabulary

    seqio_tasks.register(data_dir, tokenizer)  # phi's tasks, web among them

    def shout(ds):
        return ds.map(lambda ex: {**ex, "targets": tf.strings.upper(ex["targets"])})

    seqio_tasks.add_text_task("notes", "notes", data_dir, HFTokenizerVocabulary(tokenizer), preprocessors=[shout])
'''


def _team(tmp_path, monkeypatch):
    """A tasks module of its own on sys.path (none of phi_jax edited), and its DATA_DIR."""
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "my_team_tasks.py").write_text(TEAM_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    root = tmp_path / "data"
    for split, n in (("train", 150), ("validation", 10)):
        _write_jsonl(root / "notes" / split / "part-0.jsonl", [d.lower() for d in _docs("synthetic", split, n)])
        _write_jsonl(root / "notes" / split / "part-1.jsonl", [d.lower() for d in _docs("synthetic", split, n, seed=1)])
        _write_jsonl(root / "web" / split / "part-0.jsonl", _docs("web", split, 3 * n))
    sample = [d for s in WORDS_PER_DOC for d in _docs(s, "train", 50)]
    sample += [d.upper() for d in _docs("synthetic", "train", 50)]
    train_byte_level_bpe(sample + ["!?.,:;()[]{}<>=+-*/\n    "], 400, root / "tokenizer.json")
    return root


def test_a_tasks_module_of_your_own_needs_no_edit_of_phi_jax(tmp_path, monkeypatch, capsys):
    root = _team(tmp_path, monkeypatch)
    status, out, err = _cli(capsys, "data", "list", "--tasks_module", "my_team_tasks")
    assert status == 0 and "notes_and_web    notes 75.0%, web 25.0%" in out, err
    status, _, err = _cli(capsys, "data", "prepare", "notes_and_wbe", "--tasks_module", "my_team_tasks",
                          "--data_dir", root)
    assert status == 2 and "(did you mean 'notes_and_web'?)" in err
    status, out, err = _cli(capsys, "data", "prepare", "notes_and_web", "--tasks_module", "my_team_tasks",
                            "--data_dir", root)
    assert status == 0, err
    assert shards.read_mixture(root / "prepared", "notes_and_web")["tasks_module"] == "my_team_tasks"
    observed = _shares("notes_and_web", root, 50_000, seq_len=SEQ, batch_size=8, seed=0)
    assert abs(observed["notes"] - 0.75) < 0.01, observed
    tok = Tokenizer(root / "tokenizer.json")
    (first, *_) = _all_docs(root, "notes")
    assert tok.decode(first[:-1].tolist()).startswith("LESSON. ")  # the team's own preprocessor ran
    status, out, err = _cli(capsys, "data", "stats", "notes_and_web", "--data_dir", root, "--num_tokens", 20_000,
                            "--seq_len", SEQ)
    assert status == 0 and set(json.loads(out.strip().splitlines()[-1])) == {"notes", "web"}, err


def test_a_tasks_module_that_is_not_one_is_refused_by_name(capsys):
    status, _, err = _cli(capsys, "data", "list", "--tasks_module", "no_such_team.tasks")
    assert status == 2 and "--tasks_module 'no_such_team.tasks': no module 'no_such_team' on the Python path" in err
    status, _, err = _cli(capsys, "data", "prepare", "web", "--tasks_module", "json")
    assert status == 2 and "--tasks_module 'json'" in err and "has no MIXTURES and no register" in err


# --- the command line ------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    from phi_jax.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_stats_phi15_web_shows_40_20_40(corpus, capsys):
    status, out, _ = _cli(capsys, "data", "stats", "phi15_web", "--data_dir", corpus, "--num_tokens", 200_000,
                          "--seq_len", 256)
    assert status == 0
    shares = json.loads(out.strip().splitlines()[-1])
    assert set(shares) == {"web", "code", "synthetic"}
    for task, expected in {"web": 0.4, "code": 0.2, "synthetic": 0.4}.items():
        assert abs(shares[task] - expected) < 0.01, out


def test_cli_list_preview_and_errors(corpus, capsys):
    status, out, _ = _cli(capsys, "data", "list")
    assert status == 0 and "phi15_web        web 40.0%, code 20.0%, synthetic 40.0%" in out
    assert "default_code" in out
    status, out, _ = _cli(capsys, "data", "preview", "phi15_web", "--data_dir", corpus, "--num", 2, "--seq_len", 32)
    assert status == 0 and out.count("=== row") == 2 and "<|endoftext|>" in out
    status, out, _ = _cli(capsys, "data", "preview", "web", "--data_dir", corpus, "--raw", "--num", 1)
    assert status == 0 and "=== web train document 0" in out
    status, _, err = _cli(capsys, "data", "stats", "phi15_web", "--data_dir", corpus / "nope")
    assert status == 2 and f"phi-jax data: error: mixture 'phi15_web': {corpus / 'nope'} does not exist" in err


def test_help_and_core_import_no_tensorflow_seqio_or_grain():
    code = """
import importlib, sys
for name in ("tensorflow", "seqio", "grain", "gin", "array_record"):
    sys.modules[name] = None  # any import of them now fails
from phi_jax import cli
for name in ("phi_jax", "phi_jax.model", "phi_jax.attention", "phi_jax.hf", "phi_jax.checkpoint",
             "phi_jax.generate", "phi_jax.train_step", "phi_jax.sharding", "phi_jax.optimizer",
             "phi_jax.metrics", "phi_jax.distributed", "phi_jax.data", "phi_jax.data.tokenizer"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
try:
    cli.main(["--help"])
except SystemExit as e:
    assert e.code == 0
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert "data" in result.stdout


# --- the embedded default --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_mixture_builds_offline_and_streams(tmp_path_factory, monkeypatch):
    with _shared(tmp_path_factory, "phi_jax_cache") as (cache, _):
        monkeypatch.setenv("PHI_JAX_CACHE", str(cache))
        tok = data.load_tokenizer(None)
    assert tok.vocab_size == 4096 and tok.eos_id == 4095 and tok.encode("!") == [0]
    assert tok.decode(tok.encode("def gcd(a, b):\n    return a")) == "def gcd(a, b):\n    return a"
    it = data.make_train_iterator("default", data_dir=None, seq_len=128, batch_size=2, seed=0)
    batch = next(it)
    assert batch["tokens"].shape == (2, 128) and batch["tokens"].max() < 4096
    root = data.prepared_dir("default")
    assert data.mixture_shares("default") == data_tasks.MIXTURES["default"]
    for task in data_tasks.DEFAULT_TASKS:
        assert shards.split_totals(root, task)["tokens"] > 100_000
        assert shards.split_totals(root, task, "validation")["docs"] >= 2
    assert sum(b["loss_weights"].sum() for b in data.make_eval_iterator("default", data_dir=None, seq_len=512,
                                                                        batch_size=4)) > 20_000


@pytest.mark.slow
def test_tfds_dataset_by_name(tmp_path, caplog):
    import tensorflow_datasets as tfds

    from phi_jax.data.prepare import prepare

    class PhiJaxTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        url_infos = None  # nothing to download; spares tfds looking for checksum files beside this module

        def _info(self):
            features = tfds.features.FeaturesDict({"body": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(20), "test": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"body": "" if i == 2 else f"document {i} " * (i + 1)}

    PhiJaxTinyText(data_dir=tmp_path / "tfds").download_and_prepare()
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "tfds.json").write_text(json.dumps({
        "name": "phi_jax_tiny_text", "data_dir": str(tmp_path / "tfds"), "text_key": "body",
        "splits": {"train": "train", "validation": "test"}}))
    train_byte_level_bpe(["document 0 1 2 3 4 5 6 7 8 9"], 280, tmp_path / "tokenizer.json")
    report = prepare("web", data_dir=tmp_path)["report"]
    assert dict(report.counts) == {"empty document": 2}  # example 2 of each split
    assert "tfds://phi_jax_tiny_text/train/00000-of-00001:record" in caplog.text
    assert shards.split_totals(tmp_path / "prepared", "web")["docs"] == 19
    tok = Tokenizer(tmp_path / "tokenizer.json")
    texts = sorted(tok.decode(d[:-1].tolist()) for d in _all_docs(tmp_path, "web"))
    assert texts == sorted(f"document {i} " * (i + 1) for i in range(20) if i != 2)
