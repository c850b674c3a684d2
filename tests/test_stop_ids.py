"""Generation stops a row on any of a set of stop ids (a chat template's end-of-turn tokens), eos_id as before."""

import jax
import numpy as np
import pytest

from phi_jax import tiny
from phi_jax.generate import _generate, complete, generate, left_pad, new_tokens
from phi_jax.model import init_params

CONFIG = tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, head_dim=16, rotary_dim=8,
              num_layers=1)
NEW = 12


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, jax.random.key(1))
    # Larger weights than the init's, so that greedy decoding wanders over many ids instead of repeating one.
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params)
    prompts = [[5, 9, 2], [17, 3, 3, 8, 1], [40]]
    tokens_BxP, lengths = left_pad(prompts)
    free = np.asarray(generate(CONFIG, params, tokens_BxP, NEW, prompt_lengths=lengths))[:, tokens_BxP.shape[1]:]
    return params, tokens_BxP, lengths, free


def _first_stop(row, stops):
    return next(i for i, token in enumerate(row) if token in stops)


def test_each_row_stops_at_its_first_stop_id_and_is_padded_after(model):
    params, tokens_BxP, lengths, free = model
    stops = [int(free[0, 3]), int(free[1, 6])]
    assert len(set(free[0].tolist() + free[1].tolist())) > 4, free  # the choice of stops means something
    out = np.asarray(generate(CONFIG, params, tokens_BxP, NEW, stop_ids=stops, pad_id=63,
                              prompt_lengths=lengths))[:, tokens_BxP.shape[1]:]
    for row in range(3):
        if not set(stops) & set(free[row].tolist()):
            np.testing.assert_array_equal(out[row], free[row])
            continue
        end = _first_stop(free[row].tolist(), set(stops))
        np.testing.assert_array_equal(out[row, :end + 1], free[row, :end + 1])
        assert (out[row, end + 1:] == 63).all(), out[row]
    cut = new_tokens(np.concatenate([tokens_BxP, out], axis=1), tokens_BxP.shape[1], stop_ids=stops)
    assert cut[0] == free[0, :_first_stop(free[0].tolist(), set(stops))].tolist()


def test_eos_id_and_stop_ids_together_stop_on_either_and_complete_cuts_there(model):
    params, _, _, free = model
    prompts = [[5, 9, 2], [17, 3, 3, 8, 1], [40]]
    eos, stop = int(free[1, 2]), int(free[2, 1])
    assert eos != stop, free
    replies = complete(CONFIG, params, prompts, NEW, batch_size=2, eos_id=eos, stop_ids=[stop])
    for prompt, reply, row in zip(prompts, replies, free):
        row = row.tolist()
        end = next((i for i, token in enumerate(row) if token in (eos, stop)), len(row))
        assert reply == row[:end], (prompt, reply, row)
    # eos_id alone behaves as before: the row stops at it, and pads with it.
    alone = complete(CONFIG, params, prompts, NEW, batch_size=2, eos_id=eos)
    assert alone == [row.tolist()[:_first_stop(row.tolist() + [eos], {eos})] for row in free]


def test_stop_sets_of_any_size_up_to_the_slots_share_one_compilation(model):
    params, tokens_BxP, lengths, free = model
    generate(CONFIG, params, tokens_BxP, NEW, prompt_lengths=lengths)
    compiled = _generate._cache_size()
    for stops in ([1], [2, 3, 4], list(range(8))):
        generate(CONFIG, params, tokens_BxP, NEW, stop_ids=stops, prompt_lengths=lengths)
        generate(CONFIG, params, tokens_BxP, NEW, eos_id=7, stop_ids=stops[:-1], prompt_lengths=lengths)
    assert _generate._cache_size() == compiled
    with pytest.raises(ValueError, match="stop ids must be token ids"):
        generate(CONFIG, params, tokens_BxP, NEW, stop_ids=[-3])
