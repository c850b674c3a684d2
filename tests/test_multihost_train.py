"""Training on several processes: data shards that do not depend on how many processes read them."""

import json

import numpy as np
import pytest
from etils import epath

from phi_jax import data
from phi_jax.checkpoint import DataHandler, DataPositionError, DataRestore


def assert_side_by_side(batch, blocks):
    for key, value in batch.items():
        np.testing.assert_array_equal(value, np.concatenate([block[key] for block in blocks]))


def test_two_data_shards_read_by_one_process_are_the_rows_two_processes_read(tmp_path):
    shards = dict(data_dir=None, seq_len=32, seed=0, shard_count=2)
    apart = [data.make_train_iterator("default", batch_size=2, shard_index=i, **shards) for i in range(2)]
    together = data.make_train_iterator("default", batch_size=4, local_shards=2, **shards)
    for _ in range(3):
        assert_side_by_side(next(together), [next(it) for it in apart])

    # Each of two processes saved its own shard's position; one process resumes both.
    for i, it in enumerate(apart):
        (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps(it.get_state()))
    resumed = data.make_train_iterator("default", batch_size=4, local_shards=2, **shards)
    DataHandler().restore(epath.Path(tmp_path), DataRestore(resumed))
    assert_side_by_side(next(resumed), [next(it) for it in apart])

    other_layout = data.make_train_iterator("default", data_dir=None, seq_len=32, seed=0, batch_size=4)
    with pytest.raises(DataPositionError, match="split into 2 data shards, this one into 1.*data_shards=2"):
        DataHandler().restore(epath.Path(tmp_path), DataRestore(other_layout))


def test_a_data_position_saved_before_streams_named_their_shards_resumes():
    it = data.make_train_iterator("default", data_dir=None, seq_len=32, seed=0, batch_size=2)
    next(it)
    saved_then = it.get_state()["shards"]["0"]  # the whole state of a stream without ShardRows
    resumed = data.make_train_iterator("default", data_dir=None, seq_len=32, seed=0, batch_size=2)
    resumed.set_state(saved_then)
    assert_side_by_side(next(resumed), [next(it)])


def test_a_data_shard_that_ends_first_gives_padding_rows():
    shards = dict(data_dir=None, seq_len=512, shard_count=2)
    apart = [list(data.make_eval_iterator("default", batch_size=2, shard_index=i, **shards)) for i in range(2)]
    together = list(data.make_eval_iterator("default", batch_size=4, local_shards=2, **shards))
    assert len(apart[0]) != len(apart[1]) and len(together) == max(map(len, apart))
    padding = {key: np.zeros_like(value) for key, value in apart[0][0].items()}
    for step, batch in enumerate(together):
        assert_side_by_side(batch, [rows[step] if step < len(rows) else padding for rows in apart])
