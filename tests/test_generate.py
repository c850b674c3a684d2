"""phi_jax.generate against transformers' generate on an exported tiny model, the top-k / top-p
filters against transformers' warpers, sampling frequencies, one compilation per shape, and the
`phi-jax generate` command (text and ids, several prompts, prompt files).

torch and transformers are imported only by the tests that compare with them (through `exported`,
`hf_generate`, `hf_fixtures`); the others use `ours`, a model built by phi_jax alone, and are marked
`core`: they run under the newest jax too (.ci/newest_jax.sh), where there is no torch or transformers."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import hf
from phi_jax.config import tiny
from phi_jax.generate import _generate, complete, filter_top_k_top_p, generate, left_pad, new_tokens, sample_tokens
from phi_jax.model import Phi, init_params, stack_layers
from tests.cli_runner import run

HF_FIELDS = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, partial_rotary_factor=0.5, max_position_embeddings=256)
# HF_FIELDS as our config (the `exported` fixture checks that hf.load reads this).
CONFIG = tiny(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16,
              rotary_dim=8, max_position_embeddings=256)
PROMPT_LENGTHS = (37, 1, 60)  # one row is all padding but its last column
NEW = 12


def hf_fixtures():
    """tests/hf_fixtures, which imports torch and transformers: only the tests that compare with them call it."""
    try:
        from tests import hf_fixtures as fx
    except ImportError:  # tests/ on sys.path instead of the repository root
        import hf_fixtures as fx
    return fx


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(transformers model, its directory, our config, our params) of one tiny random phi."""
    model = hf_fixtures().make_hf_model(seed=3, **HF_FIELDS)
    path = tmp_path_factory.mktemp("gen") / "hf"
    model.save_pretrained(path)
    config, params = hf.load(path)
    assert config == CONFIG
    return model, path, config, params


@pytest.fixture(scope="module")
def ours():
    """(config, params) of a tiny random phi of `exported`'s shape, built by phi_jax alone (no torch or
    transformers). Perturbed as hf_fixtures.make_hf_model perturbs its model: weights normal(0.08),
    biases normal(0.05), LayerNorm scales 1 + normal(0.1) and biases normal(0.1), so the logits are as
    spread out as the exported model's, not as flat as a fresh init's (std 0.02, zero biases)."""
    params = init_params(CONFIG, jax.random.key(3))
    rng = np.random.default_rng(3)

    def perturb(path, leaf):
        names = [getattr(key, "key", str(key)) for key in path]
        if names[-2].endswith("ln"):  # ln, final_ln
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape) if names[-1] == "scale" else \
                0.1 * rng.standard_normal(leaf.shape)
        elif names[-1] == "bias":
            value = 0.05 * rng.standard_normal(leaf.shape)
        else:
            value = 0.08 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return CONFIG, jax.tree_util.tree_map_with_path(perturb, params)


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, HF_FIELDS["vocab_size"], n).tolist() for n in lengths]


def hf_generate(model, prompt, steps, **kwargs):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def test_greedy_left_padded_batch_equals_transformers_generate(exported):
    import torch

    model, _, config, params = exported
    batch = prompts()
    tokens_BxP, lengths = left_pad(batch, multiple=16)
    ours = generate(config, params, tokens_BxP, NEW, prompt_lengths=lengths)
    np.testing.assert_array_equal(ours[:, :tokens_BxP.shape[1]], tokens_BxP)
    for row, prompt in enumerate(batch):
        theirs = hf_generate(model, prompt, NEW, min_new_tokens=NEW)
        assert ours[row, tokens_BxP.shape[1]:].tolist() == theirs, f"row {row} (prompt of {len(prompt)})"
    # transformers' own left-padded batch agrees as well.
    mask = (np.arange(tokens_BxP.shape[1])[None] >= tokens_BxP.shape[1] - lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        theirs = model.generate(torch.tensor(tokens_BxP, dtype=torch.long), attention_mask=torch.tensor(mask),
                                max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours)[:, tokens_BxP.shape[1]:], theirs[:, tokens_BxP.shape[1]:].numpy())


def test_rows_stop_at_eos_like_transformers(exported):
    model, _, config, params = exported
    batch = prompts()
    tokens_BxP, lengths = left_pad(batch, multiple=16)  # the greedy test's shape: compiled once
    free = np.asarray(generate(config, params, tokens_BxP, NEW, prompt_lengths=lengths))[:, tokens_BxP.shape[1]:]
    eos = int(free[0, 3])  # row 0 emits it at step 3 (or earlier); the others whenever they do
    ours = generate(config, params, tokens_BxP, NEW, prompt_lengths=lengths, eos_id=eos, pad_id=7)
    new_BxN = np.asarray(ours)[:, tokens_BxP.shape[1]:]
    for row, prompt in enumerate(batch):
        theirs = hf_generate(model, prompt, NEW, eos_token_id=eos)
        stop = theirs.index(eos) + 1 if eos in theirs else NEW
        assert new_BxN[row, :stop].tolist() == theirs[:stop]
        assert (new_BxN[row, stop:] == 7).all()
    assert new_tokens(ours, tokens_BxP.shape[1], eos)[0] == free[0, :list(free[0]).index(eos)].tolist()


def test_filters_keep_what_transformers_warpers_keep():
    import torch
    import transformers

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 300)).astype(np.float32) * 3
    logits[0, :5] = 9.0  # ties at the top: top-k keeps them all, as transformers does; at a top-p
    # boundary transformers keeps whichever of the tied tokens its sort put last, we keep them all
    for top_k, top_p in [(0, 0.9), (5, 1.0), (40, 0.5), (3, 0.999), (1, 1.0), (0, 1e-6), (400, 0.3)]:
        scores = torch.tensor(logits)
        if top_k:
            scores = transformers.TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = transformers.TopPLogitsWarper(top_p)(None, scores)
        ours = filter_top_k_top_p(jnp.asarray(logits), top_k, top_p)
        rows = slice(0 if top_p == 1 else 1, None)
        np.testing.assert_array_equal(np.isfinite(ours)[rows], torch.isfinite(scores).numpy()[rows],
                                      err_msg=f"{top_k}, {top_p}")


@pytest.mark.core
def test_sampling_frequencies_follow_the_filtered_softmax():
    rows, temperature, top_p = 4000, 1.7, 0.8
    logits_V = jnp.asarray(np.random.default_rng(2).normal(size=512) * 2.5, jnp.float32)
    expected = np.asarray(jax.nn.softmax(filter_top_k_top_p(logits_V[None] / temperature, 0, top_p)[0]))
    drawn = jax.jit(sample_tokens)(jnp.tile(logits_V, (rows, 1)), jax.random.key(4), temperature, 0, top_p)
    counts = np.bincount(np.asarray(drawn), minlength=expected.size) / rows
    assert counts[expected == 0].sum() == 0
    sigma = np.sqrt(expected * (1 - expected) / rows)
    assert np.all(np.abs(counts - expected) <= 5 * sigma + 1e-9)
    assert (expected > 0).sum() > 3  # the test means something: several tokens are in play


@pytest.mark.core
def test_top_k_samples_stay_in_the_top_k_and_one_compilation_serves_all_settings(ours):
    config, params = ours
    tokens_BxP, lengths = left_pad(prompts(), multiple=16)
    steps = NEW + 1  # a shape no other test compiles
    before = _generate._cache_size()
    greedy = generate(config, params, tokens_BxP, steps, prompt_lengths=lengths)
    for top_k, top_p in [(1, 1.0), (0, 1e-7)]:
        same = generate(config, params, tokens_BxP, steps, 1.0, jax.random.key(9), top_k=top_k, top_p=top_p,
                        prompt_lengths=lengths)
        np.testing.assert_array_equal(same, greedy)
    sampled = generate(config, params, tokens_BxP, steps, 2.0, jax.random.key(1), top_k=3, eos_id=5,
                       prompt_lengths=lengths)
    assert _generate._cache_size() - before == 1
    assert not np.array_equal(sampled, greedy)
    # The logits each sampled token was drawn from: one left-padded forward of the whole result.
    width = tokens_BxP.shape[1]
    column = np.arange(width + steps - 1)[None]
    pad = width - lengths[:, None]
    logits = Phi(config).apply({"params": params}, sampled[:, :-1], positions_BxT=np.maximum(column - pad, 0),
                               segment_ids_BxT=(column >= pad).astype(np.int32))
    top3 = np.argsort(-np.asarray(logits[:, width - 1:]), axis=-1)[..., :3]
    new = np.asarray(sampled[:, width:])
    for row in range(len(lengths)):
        for step, token in enumerate(new[row]):
            assert token in top3[row, step], (row, step)
            if token == 5:
                assert (new[row, step + 1:] == 5).all()
                break


def _while_body_ops(hlo_text: str):
    """{computation name: its instruction lines} of optimized HLO text, and the while loops' bodies."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif name and line.startswith("  "):
            computations[name].append(line.strip())
    bodies = [m.group(1) for m in re.finditer(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo_text)]
    return computations, bodies


@pytest.mark.core
@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_decode_loop_writes_the_kv_cache_in_place(ours, scan_layers):
    """Every op of the compiled decode step that outputs a whole layer's cache is an in-place
    dynamic-update-slice: no copy, transpose or stack of the cache per token (which made batch-16
    decoding 4x slower than it is). Scanned params decode through the same per-layer cache."""
    config, params = ours
    config = config.replace(scan_layers=scan_layers)
    if scan_layers:
        params = stack_layers(params, config.num_layers)
    tokens_BxP, lengths = left_pad(prompts(), multiple=16)
    steps = 5
    args = (config, params, jnp.asarray(tokens_BxP), jnp.asarray(lengths), steps, jnp.float32(0), jnp.int32(0),
            jnp.float32(1), jnp.int32(-1), jnp.int32(0), jax.random.key(0))
    computations, bodies = _while_body_ops(_generate.lower(*args).compile().as_text())
    assert bodies, "the decode loop was not found in the compiled HLO"
    cache_elements = len(lengths) * config.num_heads * (tokens_BxP.shape[1] + steps) * config.head_dim
    roots = {name: next((op for op in ops if op.startswith("ROOT")), "") for name, ops in computations.items()}
    writes_per_loop = []
    for body in bodies:
        writes_per_loop.append(0)
        for op in computations[body]:
            output = re.search(r"= (\w+)\[([\d,]*)\]\{[^}]*\} ([\w\-]+)\(", op)
            if not output or np.prod([int(d) for d in output.group(2).split(",") if d]) < cache_elements:
                continue
            kind, called = output.group(3), re.search(r"calls=%?([\w.\-]+)", op)
            if kind in ("get-tuple-element", "parameter", "bitcast"):
                continue
            assert kind == "dynamic-update-slice" or (
                kind == "fusion" and "dynamic-update-slice(" in roots[called.group(1)]), \
                f"the decode step makes a cache-sized array by {kind}: {op[:200]}"
            writes_per_loop[-1] += 1
    decode_loops = [writes for writes in writes_per_loop if writes]  # greedy and sampling
    assert decode_loops == [2 * config.num_layers] * 2
    np.testing.assert_array_equal(generate(config, params, tokens_BxP, steps, prompt_lengths=lengths),
                                  generate(*ours, tokens_BxP, steps, prompt_lengths=lengths))


def test_one_token_prompts_have_no_prefill_and_still_match(exported):
    model, _, config, params = exported
    ours = generate(config, params, np.asarray([[5], [300]]), 4)
    for row, token in enumerate([5, 300]):
        assert ours[row, 1:].tolist() == hf_generate(model, [token], 4, min_new_tokens=4)


def test_padding_does_not_count_against_the_position_window(exported):
    """The longest prompt + new tokens fill the 256 positions but for 3; padded to a multiple of 64 it
    is 256 columns long, which must not be refused: pad columns take cache slots, not positions."""
    model, _, config, params = exported
    batch = prompts((241, 5), seed=4)
    ours = complete(config, params, batch, NEW, batch_size=2, multiple=64)
    for prompt, new in zip(batch, ours):
        assert new == hf_generate(model, prompt, NEW, min_new_tokens=NEW), f"prompt of {len(prompt)}"


@pytest.mark.core
def test_rejects_bad_arguments(ours):
    config, params = ours
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(config, params, np.ones((2, 4), np.int32), 3, prompt_lengths=[4, 0])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(config, params, np.ones((1, 250), np.int32), 10)


# ------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from phi_jax.data.tokenizer import train_byte_level_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    text = ["def add(a, b):\n    return a + b\n", "The cat sat on the mat. " * 5, "for i in range(10):\n"] * 20
    train_byte_level_bpe(text, 300, path)
    return path


def test_cli_several_prompts_are_batched_and_each_gets_its_own_greedy_continuation(exported, capsys, tmp_path):
    model, path, _, _ = exported
    batch = prompts((5, 11))
    status, out, err = run(capsys, "generate", path, "--prompt_ids", ",".join(map(str, batch[0])),
                           "--prompt_ids", " ".join(map(str, batch[1])), "--max_new_tokens", 6)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for prompt, line in zip(batch, lines):
        assert line.split() == list(map(str, hf_generate(model, prompt, 6, min_new_tokens=6)))
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in batch))
    status, from_file, _ = run(capsys, "generate", path, "--prompt_file", prompt_file, "--max_new_tokens", 6)
    assert status == 0 and from_file == out
    # A bad line is named by its number in the file, blank lines counted.
    cases = [("{prompt_ids: [1]}", "not a JSON value"), ('{"ids": [1]}', "expected a string, a list of ids")]
    for bad, message in cases:
        prompt_file.write_text(f'"def f("\n\n{bad}\n')
        status, _, err = run(capsys, "generate", path, "--prompt_file", prompt_file, "--max_new_tokens", 6)
        assert status != 0 and f"{prompt_file}:3: {message}" in err, err


def test_cli_text_prompts_with_a_tokenizer(exported, capsys, tmp_path, tokenizer_file):
    from phi_jax.data.tokenizer import Tokenizer

    model, path, _, _ = exported
    tokenizer = Tokenizer(tokenizer_file)
    texts = ["def add(a, b):", "The cat\nsat"]
    status, out, err = run(capsys, "generate", path, "--prompt", texts[0], "--prompt", texts[1], "--tokenizer",
                           tokenizer_file, "--max_new_tokens", 4, "--ids")
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for text, line in zip(texts, lines):
        expected = hf_generate(model, tokenizer.encode(text), 4, eos_token_id=tokenizer.eos_id)
        assert line.split() == list(map(str, expected[:expected.index(tokenizer.eos_id)] if tokenizer.eos_id in
                                         expected else expected))
    status, out, _ = run(capsys, "generate", path, "--prompt", texts[0], "--prompt", texts[1], "--tokenizer",
                         tokenizer_file, "--max_new_tokens", 4, "--ids", "--eos_id", expected[0], "--ignore_eos")
    assert status == 0 and [len(line.split()) for line in out.strip().splitlines()] == [4, 4]
    (tmp_path / "p.txt").write_text("The cat\\nsat\ndef add(a, b):\n")  # one prompt a line; \n escapes a newline
    status, out, _ = run(capsys, "generate", path, "--prompt_file", tmp_path / "p.txt", "--tokenizer", tokenizer_file,
                         "--max_new_tokens", 4, "--temperature", 0.8, "--top_k", 20, "--top_p", 0.9, "--seed", 3)
    assert status == 0 and out.startswith("The cat\nsat") and "-" * 40 + "\ndef add(a, b):" in out
