"""Instruction tuning: chat rendering exact to transformers, chat data through prepare -> shards -> stream
with its loss mask, the masked loss against transformers', packing and microbatches, and a tiny run that
learns to answer and stop. Everything is made here: a small BPE, random transformers models, JSONL files."""

import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from phi_jax import data, token_rows
from phi_jax.config import PhiConfig
from phi_jax.data import chat
from phi_jax.data.tokenizer import train_byte_level_bpe
from phi_jax.model import Phi
from phi_jax.optimizer import OptimizerConfig
from phi_jax.train_step import _split_microbatches, make_train_step, new_state, weighted_losses
from tests import hf_fixtures as fx

SEQ = 96
WORDS = ["the", "cat", "sat", "on", "mat", "héllo", "naïve", "日本語", "🎉", "def", "f(x):", "return", "  ",
         "\n", "x + 1", "ok.", "Über", "", "tab\t", "<b>&amp;</b>", "'quote'", '"dq"']
# A template as a Hugging Face tokenizer_config.json carries one: special-token variables, namespace,
# filters, tojson of a message (key order and unicode show), whitespace control around the generation tag.
CONFIG_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set ns = namespace(tag=message['role'] | upper) %}"
    "{% if message['role'] == 'system' %}{{ message | tojson }}\n"
    "{% else %}### {{ ns.tag }}:\n"
    "{% if message['role'] == 'assistant' %}{%- generation -%} {{ message['content'] | trim }}{{ eos_token }}"
    "{%- endgeneration %}\n{% else %}{{ message['content'] }}\n{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT:\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 300-id BPE with <|im_start|> and <|im_end|> added, and a tokenizer_config.json with a chat template."""
    from tokenizers import AddedToken, Tokenizer

    directory = tmp_path_factory.mktemp("tok")
    text = ["USER: what is the cat?\nASSISTANT: The cat sat on the mat.", "def f(x):\n    return x + 1\n",
            "### SYSTEM: héllo naïve Über 日本語"] * 20
    train_byte_level_bpe(text, 300, directory / "tokenizer.json")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in chat.TEMPLATE_TOKENS["chatml"]])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "chat_template": CONFIG_TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def random_text(rng) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.integers(0, 7)))
    return text + " " * int(rng.integers(0, 3))  # trailing spaces


def random_conversation(rng, end_with_assistant=True) -> list[dict]:
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.integers(1, 4)):
        messages += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    return messages if end_with_assistant else messages[:-1]


def hf_encode(hf_tokenizer, messages, template, add_generation_prompt=False):
    out = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True,
                                           add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("template", ["phi", "chatml", None])
def test_encode_chat_equals_transformers_on_sixty_conversations(tokenizer_dir, hf_tokenizer, rng, template):
    source = chat.TEMPLATES.get(template)  # None: the tokenizer_config.json's, for both
    for i in range(60):
        prompt = i % 6 == 5  # some as prompts for a reply, ending with the user
        messages = random_conversation(rng, end_with_assistant=not prompt)
        ids, mask = chat.encode_chat(messages, tokenizer_dir, template, add_generation_prompt=prompt)
        assert (ids, mask) == hf_encode(hf_tokenizer, messages, source, prompt), messages
        if not prompt:
            assert sum(mask) > 0


def test_the_mask_covers_the_replies_and_their_end_of_turn_token_only(tokenizer_dir, hf_tokenizer):
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on"},
                {"role": "user", "content": "mat"}, {"role": "assistant", "content": "ok."}]
    for template, end in chat.END_OF_TURN.items():
        ids, mask = chat.encode_chat(messages, tokenizer_dir, template)
        trained = hf_tokenizer.decode([i for i, m in zip(ids, mask) if m])
        assert trained.replace(end, "|").split("|") == [" sat on" if template == "phi" else "sat on",
                                                         " ok." if template == "phi" else "ok.", ""]


def test_bad_conversations_and_templates_are_clear_errors(tokenizer_dir):
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok."}]
    with pytest.raises(chat.ChatError, match="no {% generation %} block"):
        chat.encode_chat(turn, tokenizer_dir, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(chat.ChatError, match="no assistant turn"):
        chat.encode_chat(turn[:1], tokenizer_dir, "phi")
    with pytest.raises(chat.ChatError, match="message 1: unknown role 'bot'"):
        chat.encode_chat([turn[0], {"role": "bot", "content": "x"}], tokenizer_dir, "phi")
    with pytest.raises(chat.ChatError, match="phi chat template has no role tool"):
        chat.encode_chat(turn + [{"role": "tool", "content": "x"}], tokenizer_dir, "phi")
    with pytest.raises(chat.ChatError, match="not a built-in template"):
        chat.encode_chat(turn, tokenizer_dir, "chatm")
    # A prompt needs neither markers nor an assistant turn (serve's /v1/chat/completions).
    ids, mask = chat.encode_chat(turn[:1], tokenizer_dir, "{{ messages[0]['content'] }}", add_generation_prompt=True)
    assert ids and mask == [0] * len(ids)


def test_find_chat_template_reads_the_jinja_file_first_then_the_config(tokenizer_dir, tmp_path):
    assert chat.find_chat_template(tokenizer_dir) == CONFIG_TEMPLATE
    assert chat.find_chat_template(tokenizer_dir / "tokenizer.json") == CONFIG_TEMPLATE
    assert chat.find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]}))
    assert chat.find_chat_template(tmp_path) == "d"
    (tmp_path / "chat_template.jinja").write_text("j")
    assert chat.find_chat_template(tmp_path) == "j"
    # chat_template may name such files, or a built-in template.
    assert chat.resolve_template(tmp_path / "chat_template.jinja") == "j"
    assert chat.resolve_template(tokenizer_dir / "tokenizer_config.json") == CONFIG_TEMPLATE
    assert chat.resolve_template("chatml") == chat.CHATML_TEMPLATE


def test_every_record_format_gives_the_same_conversation():
    expected = [{"role": "user", "content": "Add 2 and 3.\n\nuse ints"}, {"role": "assistant", "content": "5"}]
    records = [{"messages": expected},
               {"conversations": [{"from": "human", "value": "Add 2 and 3.\n\nuse ints"},
                                  {"from": "gpt", "value": "5"}]},
               {"instruction": "Add 2 and 3.", "input": "use ints", "output": "5"},
               {"prompt": "Add 2 and 3.\n\nuse ints", "completion": "5"}]
    assert all(chat.messages_of(r) == expected for r in records)
    with pytest.raises(chat.ChatError, match="unknown speaker"):
        chat.messages_of({"conversations": [{"from": "narrator", "value": "x"}]})
    with pytest.raises(chat.ChatError, match="no conversation in the record"):
        chat.messages_of({"text": "x"})


def test_truncation_keeps_whole_assistant_turns():
    mask = [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]
    assert chat.truncate_at_turn(range(11), mask, 11) == 11
    assert chat.truncate_at_turn(range(11), mask, 10) == 9
    assert chat.truncate_at_turn(range(11), mask, 8) == 4
    assert chat.truncate_at_turn(range(11), mask, 3) is None


# --------------------------------------------------------------------------------------------- the data path

REPLIES = {"what is the cat?": "The cat sat.", "héllo": "Hi 🎉", "def f(x):": "return x + 1",
           "where?": "On the mat."}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """DATA_DIR with a chat task in every record format (and bad records) mixed with a text task, prepared
    with the chatml template (its two tokens added to a tokenizer that lacks them) and max_tokens=SEQ."""
    from tokenizers import Tokenizer

    data_dir = tmp_path_factory.mktemp("data")
    text = ["what is the cat? The cat sat on the mat.", "def f(x):\n    return x + 1\n", "héllo naïve 🎉"] * 20
    train_byte_level_bpe(text, 300, data_dir / "tokenizer.json")
    (data_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    good = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in REPLIES.items()]
    good += [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                                {"from": "gpt", "value": "bye!"}]},
             {"instruction": "Say it.", "input": "the cat", "output": "the cat"},
             {"prompt": "1 + 1?", "completion": "2"},
             # Over SEQ tokens: cut after its first reply.
             {"messages": [{"role": "user", "content": "long?"}, {"role": "assistant", "content": "yes."},
                           {"role": "user", "content": "the cat sat " * 40}, {"role": "assistant", "content": "no"}]}]
    bad = ['{"messages": [{"role": "bot", "content": "x"}]}', '{"messages": [{"role": "user", "content": "x"}]}',
           "not json", '{"text": "no conversation"}']
    for split in ("train", "validation"):
        (data_dir / "chat" / split).mkdir(parents=True)
        (data_dir / "chat" / split / "part-0.jsonl").write_text("\n".join([json.dumps(r) for r in good] + bad))
        (data_dir / "synthetic" / split).mkdir(parents=True)
        (data_dir / "synthetic" / split / "part-0.jsonl").write_text(
            "\n".join(json.dumps({"text": t}) for t in text[:6]))
    (data_dir / "sft_tasks.py").write_text(
        "from data_tasks import CHAT_TASKS, register  # noqa: F401\n"
        "MIXTURES = {'sft_mix': {'chat': 0.7, 'synthetic': 0.3}}\n")
    sys.path.insert(0, str(data_dir))
    from phi_jax.data.prepare import prepare

    result = prepare("sft_mix", data_dir=data_dir, tasks_module="sft_tasks", chat_template="chatml", max_tokens=SEQ)
    root = data_dir / "prepared"
    tokens = json.loads((root / "chat_tokens.json").read_text())
    vocab = Tokenizer.from_file(str(root / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    expected = {}
    for record in good:
        ids, mask = chat.encode_chat(chat.messages_of(record), root, "chatml")
        keep = chat.truncate_at_turn(ids, mask, SEQ)
        expected[tuple(ids[:keep])] = mask[:keep]  # the first token is an input only (its weight is 0)
    return {"dir": data_dir, "root": root, "result": result, "tokens": tokens, "vocab": vocab,
            "expected": expected, "good": good}


def test_prepare_adds_the_template_tokens_and_counts_bad_and_cut_conversations(prepared):
    assert prepared["tokens"]["added"] == {"<|im_start|>": 300, "<|im_end|>": 301}
    assert prepared["tokens"]["trained_rows"] == 300 and prepared["vocab"] == 302
    assert chat.find_chat_template(prepared["root"]) == chat.CHATML_TEMPLATE
    assert chat.special_tokens(prepared["root"]) == {"eos_token": "<|endoftext|>"}  # kept for templates that use it
    counts = prepared["result"]["report"].counts
    # Each split: an unknown role, a conversation without a reply, malformed JSON and a text record.
    assert counts == {"unknown role": 2, "no assistant turn": 2, "malformed JSON": 2, "not a conversation": 2}
    stats = json.loads(next((prepared["root"] / "chat" / "train").glob("*.json")).read_text())
    assert stats["docs"] == len(prepared["good"]) and stats["truncated"] == 1 and stats["longest"] <= SEQ


def test_the_prepared_tokenizer_and_template_render_as_transformers_does(prepared):
    hf = transformers.AutoTokenizer.from_pretrained(str(prepared["root"]))
    for record in prepared["good"][:-1]:
        messages = chat.messages_of(record)
        assert chat.encode_chat(messages, prepared["root"]) == hf_encode(hf, messages, chat.CHATML_TEMPLATE)


def _segments(batch):
    """(row, targets, weights, tokens) of every packed segment of a first_fit batch."""
    for r in range(len(batch["tokens"])):
        for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            at = batch["segment_ids"][r] == s
            yield r, batch["targets"][r][at], batch["loss_weights"][r][at], batch["tokens"][r][at]


def _batches(prepared, mixture, n, batch_size=4):
    it = data.make_train_iterator(mixture, data_dir=prepared["dir"], seq_len=SEQ, batch_size=batch_size, seed=0,
                                  packing="first_fit")
    return [next(it) for _ in range(n)]


def test_the_stream_weights_exactly_the_assistant_tokens_of_whole_conversations(prepared):
    seen = set()
    for batch in _batches(prepared, "sft_mix", 6):
        for _, targets, weights, tokens in _segments(batch):
            key = (int(tokens[0]), *targets.tolist())
            if key in prepared["expected"]:  # a conversation, whole, from its first token (not after EOS)
                assert weights.tolist() == prepared["expected"][key][1:]
                seen.add(key)
            else:  # a text document after EOS: every target trained
                assert (weights == 1).all() and tokens[0] == 299
    assert seen == set(prepared["expected"])


# --------------------------------------------------------------------------------------------- losses

HF_MODEL = dict(vocab_size=320, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                partial_rotary_factor=0.5, max_position_embeddings=256)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from phi_jax import hf

    model = fx.make_hf_model(seed=3, **HF_MODEL)
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    config, params = hf.load(path)
    return model, config, params


def _alone(tokens, targets, weights):
    """One segment as a batch of one row from position 0, padded to SEQ (one shape: one compile)."""
    n, pad = len(tokens), (0, SEQ - len(tokens))
    return {"tokens": jnp.asarray(np.pad(tokens, pad))[None], "targets": jnp.asarray(np.pad(targets, pad))[None],
            "loss_weights": jnp.asarray(np.pad(weights, pad))[None],
            "segment_ids": jnp.asarray(np.pad(np.ones(n, np.int32), pad))[None],
            "positions": jnp.asarray(np.pad(np.arange(n, dtype=np.int32), pad))[None]}


@functools.lru_cache
def _jitted_losses(config):
    return jax.jit(lambda params, batch: weighted_losses(config, params, batch, None, 0.0, True, 32))


def _loss_sum(config, params, batch):
    return float(_jitted_losses(config)(params, batch)[1]["ce"])


def test_masked_loss_equals_transformers_with_labels_minus_100(prepared, hf_model):
    model, config, params = hf_model
    checked = 0
    for _, targets, weights, tokens in _segments(_batches(prepared, "chat", 1)[0]):
        ours = _loss_sum(config, params, _alone(tokens, targets, weights)) / weights.sum()
        conversation = np.append(tokens, targets[-1])
        assert tuple(conversation.tolist()) in prepared["expected"]  # apply_chat_template's ids, as they are
        input_ids = torch.as_tensor(conversation, dtype=torch.long)[None]
        labels = torch.as_tensor(np.append(-100, np.where(weights > 0, targets, -100)), dtype=torch.long)[None]
        with torch.no_grad():
            theirs = float(model(input_ids, labels=labels).loss)
        assert abs(ours - theirs) < 1e-5, (ours, theirs)
        checked += 1
    assert checked >= 2


def test_a_packed_batchs_loss_is_the_sum_of_its_conversations_alone(prepared, hf_model):
    _, config, params = hf_model
    batch = _batches(prepared, "chat", 1)[0]
    packed = _loss_sum(config, params, {k: jnp.asarray(v) for k, v in batch.items()})
    alone = sum(_loss_sum(config, params, _alone(tok, tgt, w)) for _, tgt, w, tok in _segments(batch))
    assert max(batch["segment_ids"][0]) >= 2 and abs(packed - alone) < 1e-4 * abs(alone)


def test_microbatches_give_the_gradient_of_the_whole_batch(prepared, hf_model):
    _, config, params = hf_model
    batch = {k: jnp.asarray(v) for k, v in _batches(prepared, "sft_mix", 1)[0].items()}
    grad = jax.jit(jax.grad(lambda p, b: _jitted_losses(config)(p, b)[0]))
    whole = grad(params, batch)
    micro = _split_microbatches(batch, 2)
    parts = jax.tree.map(jnp.add, *[grad(params, jax.tree.map(lambda x, i=i: x[i], micro)) for i in range(2)])
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order


# --------------------------------------------------------------------------------------------- a tiny run


@functools.lru_cache
def _jitted_forward(config):
    return jax.jit(lambda params, tokens: Phi(config).apply({"params": params}, tokens, deterministic=True))


def _greedy_reply(config, params, prompt, stop_id, limit=12):
    """Greedy tokens after `prompt` up to `stop_id`, by full forwards of one padded shape (causal: the
    padding after the last token changes nothing before it)."""
    forward = _jitted_forward(config)
    ids = list(prompt)
    for _ in range(limit):
        logits = forward(params, jnp.asarray([ids + [0] * (SEQ - len(ids))], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
        if ids[-1] == stop_id:
            break
    return ids[len(prompt):]


def test_a_tiny_run_learns_the_replies_and_stops_on_the_end_of_turn_token(prepared):
    config = PhiConfig(vocab_size=prepared["vocab"], hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=2, head_dim=32, rotary_dim=16, max_position_embeddings=SEQ)
    optimizer = OptimizerConfig(learning_rate=1e-2, weight_decay=0.0)
    step = jax.jit(make_train_step(config, optimizer))
    state = new_state(config, optimizer, 0)
    it = data.make_train_iterator("chat", data_dir=prepared["dir"], seq_len=SEQ, batch_size=4, seed=0,
                                  packing="first_fit")
    for _ in range(80):
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in next(it).items()})
    assert float(metrics["loss"]) < 0.1
    end_of_turn = prepared["tokens"]["added"]["<|im_end|>"]
    root = prepared["root"]
    for question, answer in REPLIES.items():
        prompt = chat.encode_chat([{"role": "user", "content": question}], root, add_generation_prompt=True)[0]
        full = chat.encode_chat([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                root)[0]
        reply = full[len(prompt):]
        assert _greedy_reply(config, state.params, prompt, end_of_turn) == reply[:reply.index(end_of_turn) + 1]


# --------------------------------------------------------------------------------------------- template tokens


def test_added_tokens_take_spare_rows_at_the_mean_of_the_trained_ones(rng):
    """phi's case: 50295 trained ids in 51200 rows; here 10 of 16, chatml's tokens at 10 and 11."""
    params = {"embed": {"embedding": rng.normal(size=(16, 4))}, "other": 1,
              "lm_head": {"kernel": rng.normal(size=(4, 16)), "bias": rng.normal(size=16)}}
    new = token_rows.with_token_rows(params, [10, 11], trained_rows=10, vocab_size=16)
    for name, axis, rows in (("embedding", 0, new["embed"]["embedding"]), ("kernel", 1, new["lm_head"]["kernel"]),
                             ("bias", 0, new["lm_head"]["bias"])):
        old = params["embed" if name == "embedding" else "lm_head"][name]
        take = functools.partial(np.take, axis=axis)
        np.testing.assert_array_equal(take(rows, range(10)), take(old, range(10)))
        np.testing.assert_array_equal(take(rows, range(12, 16)), take(old, range(12, 16)))
        for i in (10, 11):
            np.testing.assert_allclose(take(rows, i), take(old, range(10)).mean(axis=axis))
    assert new["other"] == 1
    with pytest.raises(token_rows.TokenRowsError, match="vocab_size to at least 17"):
        token_rows.with_token_rows(params, [16], trained_rows=10, vocab_size=16)


def test_a_fine_tune_from_a_model_without_spare_rows_grows_it_for_the_template_tokens(prepared, tmp_path):
    from phi_jax import hf, trainer

    model = fx.make_hf_model(seed=5, **{**HF_MODEL, "vocab_size": 300})  # the base tokenizer's 300 ids, no more
    model.save_pretrained(tmp_path / "hf")
    base_config, base = hf.load(tmp_path / "hf")
    config = trainer.TrainConfig(model=base_config.replace(vocab_size=302), mixture="chat",
                                 data_dir=str(prepared["dir"]), packing="first_fit", train_steps=1, batch_size=8,
                                 seq_len=SEQ, log_every=1, checkpoint_every=1, init_from=str(tmp_path / "hf"))
    params = trainer._initial_params(config, prepared["root"] / "tokenizer.json")
    embedding = params["embed"]["embedding"]
    assert embedding.shape == (302, HF_MODEL["hidden_size"]) and params["lm_head"]["bias"].shape == (302,)
    np.testing.assert_array_equal(embedding[:300], base["embed"]["embedding"])
    np.testing.assert_allclose(embedding[300:], np.tile(embedding[:300].mean(axis=0), (2, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="vocab_size=300 vs 303"):  # growing is for the template's tokens only
        trainer._initial_params(dataclasses.replace(config, model=base_config.replace(vocab_size=303)), None)
    metrics = trainer.train(config, tmp_path / "run", progress=False)
    assert np.isfinite(metrics["loss"])
    assert chat.find_chat_template(tmp_path / "run") == chat.CHATML_TEMPLATE  # the run keeps its template


def test_prepare_from_the_command_line_can_drop_overlong_conversations_instead(prepared, tmp_path, capsys):
    from phi_jax import cli

    out = tmp_path / "prepared"
    status = cli.main(["data", "prepare", "chat", "--data_dir", str(prepared["dir"]), "--out_dir", str(out),
                       "--chat_template", "chatml", "--max_tokens", str(SEQ), "--overlong", "drop"])
    assert status == 0, capsys.readouterr().err
    stats = json.loads(next((out / "chat" / "train").glob("*.json")).read_text())
    assert stats["docs"] == len(prepared["good"]) - 1 and stats["truncated"] == 0
    assert stats["skipped"]["counts"][f"conversation over {SEQ} tokens"] == 1
