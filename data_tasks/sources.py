"""Reading users' text: DATA_DIR/<source>/<split>/* as JSON lines, Parquet, TFRecord, or a TFDS dataset.

Formats, chosen by file name:
  *.jsonl, *.json, *.jsonl.gz, *.json.gz   one JSON object per line with a string field `text`
  *.parquet                                a `text` column (string or binary)
  *.tfrecord*, *.tfrecords*                tf.train.Example records with a bytes feature `text` (.gz ok)
  DATA_DIR/<source>/tfds.json              {"name": "wikipedia/20230601.en", "data_dir": null,
                                            "text_key": "text", "splits": {"train": "train", ...}}
DATA_DIR may be any path tf.io.gfile reads (local, gs://, ...).

Bad input never stops a run and is never silent: malformed JSON lines, invalid UTF-8, records without
`text` and empty documents are skipped and counted per file, with the first few file:line positions
(file:row for Parquet, file:record for TFRecord). The source keeps each file's report until
`prepare` takes it (`TextFileSource.take_report(path)`) into the shard's stats file and prints it at
the end; the reader also logs a warning per file that had any.
"""

import gzip
import io
import json
import logging
import struct

import seqio
import tensorflow as tf

from phi_jax.data.registry import SPLITS, DataError
from phi_jax.data.skips import SkipReport

log = logging.getLogger(__name__)


def _text_of(value, where, report):
    """The document text of one record's field value, or None (counted) if it is not usable."""
    if value is None:
        report.skip("no text field", where)
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            report.skip("invalid UTF-8", where)
            return None
    if not isinstance(value, str):
        report.skip("no text field", where)
        return None
    if not value.strip():
        report.skip("empty document", where)
        return None
    return value


def _open(path):
    f = tf.io.gfile.GFile(path, "rb")
    return gzip.GzipFile(fileobj=f, mode="rb") if path.endswith(".gz") else f


def jsonl_records(path, report):
    """(file:line, JSON value) of each line of a JSON lines file; invalid UTF-8 and malformed JSON are
    skipped and counted in `report`."""
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue  # blank lines are not records
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                report.skip("invalid UTF-8", where)
                continue
            try:
                yield where, json.loads(line)
            except ValueError:
                report.skip("malformed JSON", where)


def _jsonl_texts(path, report):
    for where, obj in jsonl_records(path, report):
        text = _text_of(obj.get("text") if isinstance(obj, dict) else None, where, report)
        if text is not None:
            yield text


def _parquet_texts(path, report):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if "://" in path:  # a cloud path: pyarrow reads it from memory
        with tf.io.gfile.GFile(path, "rb") as f:
            pfile = pq.ParquetFile(io.BytesIO(f.read()))
    else:
        pfile = pq.ParquetFile(path)
    if "text" not in pfile.schema_arrow.names:
        for r in range(pfile.metadata.num_rows):
            report.skip("no text field", f"{path}:row {r + 1}")
        return
    row = 0
    for batch in pfile.iter_batches(columns=["text"], batch_size=1024):
        column = batch.column(0)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = column.cast(pa.large_binary())  # decode ourselves: invalid UTF-8 is skipped, not fatal
        for value in column.to_pylist():
            row += 1
            text = _text_of(value, f"{path}:row {row}", report)
            if text is not None:
                yield text


def _tfrecord_texts(path, report):
    with _open(path) as f:
        n = 0
        while True:
            header = f.read(12)
            if not header:
                return
            n += 1
            where = f"{path}:record {n}"
            length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else -1
            data = f.read(length) if length >= 0 else b""
            if length < 0 or len(data) < length or len(f.read(4)) < 4:
                report.skip("truncated record", where)
                return
            try:
                example = tf.train.Example.FromString(data)
            except Exception:  # protobuf's DecodeError
                report.skip("malformed record", where)
                continue
            values = example.features.feature["text"].bytes_list.value if "text" in example.features.feature else []
            text = _text_of(values[0] if values else None, where, report)
            if text is not None:
                yield text


def _reader(path):
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return _jsonl_texts
    if name.endswith(".parquet"):
        return _parquet_texts
    if ".tfrecord" in name:
        return _tfrecord_texts
    return None


def read_texts(path: str, report: SkipReport):
    """The documents of one file, skipping bad records and counting them in `report`."""
    yield from _reader(path)(path, report)
    if report.total:
        log.warning("%s", f"{path}: {report.summary()}")


class TextFileSource(seqio.DataSource):
    """A seqio DataSource over DATA_DIR/<source>/<split>/ files (or a TFDS dataset), yielding {"text": ...}.

    One shard is one input file (or one TFDS shard). The skip report of each file's last complete read
    is kept until `take_report(path)`."""

    def __init__(self, task: str, source: str, data_dir):
        super().__init__(splits=SPLITS, caching_permitted=False)
        self._task, self._source, self._data_dir = task, source, str(data_dir)
        self._reports: dict[str, SkipReport] = {}

    def take_report(self, path: str) -> SkipReport:
        """The skip report of the last complete read of `path` (empty if none), forgetting it."""
        return self._reports.pop(path, SkipReport())

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def source_dir(self) -> str:
        return f"{self._data_dir.rstrip('/')}/{self._source}"

    def _tfds_config(self):
        path = f"{self.source_dir()}/tfds.json"
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            try:
                config = json.load(f)
            except ValueError as e:
                raise DataError(f"task {self._task!r}: {path} is not valid JSON ({e})") from None
        if "name" not in config:
            raise DataError(f"task {self._task!r}: {path} has no \"name\" (the TFDS dataset)")
        return config

    def list_shards(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise DataError(f"task {self._task!r}: unknown split {split!r}; expected one of {SPLITS}")
        config = self._tfds_config()
        if config is not None:
            return _tfds_shards(self._task, config, split)
        root = self._data_dir
        if not tf.io.gfile.isdir(root):
            raise DataError(f"task {self._task!r}: DATA_DIR {root} does not exist")
        split_dir = f"{self.source_dir()}/{split}"
        if not tf.io.gfile.isdir(split_dir):
            raise DataError(f"task {self._task!r}: {split_dir} does not exist (expected DATA_DIR/{self._source}/"
                            f"{split}/ with .jsonl[.gz], .parquet or .tfrecord files, "
                            f"or {self.source_dir()}/tfds.json)")
        files = sorted(f"{split_dir}/{name.rstrip('/')}" for name in tf.io.gfile.listdir(split_dir))
        files = [f for f in files if _reader(f) is not None and not tf.io.gfile.isdir(f)]
        if not files:
            raise DataError(f"task {self._task!r}: {split_dir} is empty (no .jsonl[.gz], .parquet or .tfrecord files)")
        return files

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed=None, shard_info=None,
                    *, sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
        shards = self.list_shards(split)
        if shard_info is not None:
            shards = shards[shard_info.index::shard_info.num_shards]
        if shuffle:
            import random

            random.Random(seed).shuffle(shards)

        def generate():
            for shard in shards:
                report = SkipReport()
                texts = _tfds_texts(shard, report) if shard.startswith("tfds://") else read_texts(shard, report)
                for text in texts:
                    yield {"text": text}
                self._reports[shard] = report

        return tf.data.Dataset.from_generator(generate, output_signature={"text": tf.TensorSpec([], tf.string)})


def _tfds_shards(task, config, split):
    import tensorflow_datasets as tfds

    tfds_split = config.get("splits", {}).get(split, split)
    try:
        builder = tfds.builder(config["name"], data_dir=config.get("data_dir"))
        info = builder.info.splits[tfds_split]
    except Exception as e:  # tfds raises several kinds for a missing dataset or split
        raise DataError(f"task {task!r}: TFDS dataset {config['name']!r} split {tfds_split!r} is not readable "
                        f"(data_dir={config.get('data_dir')}): {e}") from None
    n = max(1, info.num_shards)
    payload = json.dumps({"name": config["name"], "data_dir": config.get("data_dir"),
                          "text_key": config.get("text_key", "text"), "split": tfds_split})
    return [f"tfds://{config['name']}/{tfds_split}/{i:05d}-of-{n:05d}#{payload}" for i in range(n)]


def _tfds_texts(shard, report: SkipReport):
    import tensorflow_datasets as tfds

    where, payload = shard.split("#", 1)
    config = json.loads(payload)
    index, n = (int(x) for x in where.rsplit("/", 1)[1].split("-of-"))
    builder = tfds.builder(config["name"], data_dir=config["data_dir"])
    ds = builder.as_dataset(split=tfds.even_splits(config["split"], n)[index], shuffle_files=False)
    for i, example in enumerate(ds.as_numpy_iterator(), 1):
        text = _text_of(example.get(config["text_key"]), f"{where}:record {i}", report)
        if text is not None:
            yield text
    if report.total:
        log.warning("%s", f"{where}: {report.summary()}")
