"""A training workdir's tokenizer, and the complete Hugging Face export of it: tokenizer, chat template,
generation config and model card, read by transformers as written (its tokenizer, model and pipeline)."""

import json
import shutil

import numpy as np
import pytest

from phi_jax import checkpoint, cli
from phi_jax.conversation import end_of_turn_ids
from phi_jax.data import chat, load_tokenizer
from phi_jax.data.tokenizer import Tokenizer
from phi_jax.export import read_operative_config
from tests.cli_runner import run

# 64 spare embedding rows beyond the default corpus' 4096 ids, as phi has past its tokenizer's 50295.
TRAIN_TWO_STEPS = ["--gin_file=tiny_cpu", "--gin.TRAIN_STEPS=2", "--gin.WARMUP_STEPS=1", "--gin.LOG_EVERY=1",
                   "--gin.EVAL_EVERY=0", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin_bindings=tiny.num_layers=1",
                   "--gin_bindings=tiny.vocab_size=4160"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another, in Ελληνικά?"},
     {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", f"--workdir={path}", *TRAIN_TWO_STEPS]) == 0
    return path


@pytest.fixture(scope="module")
def chatml_workdir(workdir, tmp_path_factory):
    """The run as a ChatML tune leaves it: the tokenizer with <|im_start|> and <|im_end|> added (ids 4096 and
    4097, spare rows of the embedding) and the template beside it."""
    path = tmp_path_factory.mktemp("chat") / "run"
    shutil.copytree(workdir, path)
    added = chat.add_tokens(path / "tokenizer.json", chat.TEMPLATE_TOKENS["chatml"], path / "tokenizer.json")
    assert added == {"<|im_start|>": 4096, "<|im_end|>": 4097}
    (path / chat.TEMPLATE_FILE).write_text(chat.CHATML_TEMPLATE)
    return path


def _arc_easy(data_dir):
    docs = [{"id": f"q{i}", "question": question, "answerKey": "A",
             "choices": {"text": ["return a + b", "import os"], "label": ["A", "B"]}}
            for i, question in enumerate(["What does add do?", "Which line adds?"])]
    (data_dir / "arc_easy").mkdir(parents=True)
    (data_dir / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))


def test_a_workdir_keeps_its_data_tokenizer_so_eval_generate_and_export_need_no_flag(workdir, tmp_path, capsys):
    default = load_tokenizer(None)
    assert (workdir / "tokenizer.json").read_bytes() == default.path.read_bytes()
    _arc_easy(tmp_path / "data")
    results = []
    for flags in ([], ["--tokenizer", "default"]):
        status, _, err = run(capsys, "eval", "arc_easy", "--checkpoint", workdir, "--data_dir", tmp_path / "data",
                             "--output_dir", tmp_path / f"eval{len(flags)}", *flags)
        assert status == 0, err
        results.append(json.loads((tmp_path / f"eval{len(flags)}" / "eval_results.json").read_text()))
    assert results[0]["tasks"]["arc_easy"]["metrics"] == results[1]["tasks"]["arc_easy"]["metrics"]

    outputs = []
    for flags in ([], ["--tokenizer", "default"]):
        status, out, err = run(capsys, "generate", workdir, "--prompt", "def add(a, b):", "--max_new_tokens", 4,
                               *flags)
        assert status == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("def add(a, b):")

    status, out, err = run(capsys, "export-hf", workdir, tmp_path / "hf")
    assert status == 0 and "tokenizer, stops on ids [4095]" in out, err
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == default.path.read_bytes()
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())


def test_the_export_loads_in_transformers_as_it_is_with_our_chat_ids_and_stop_ids(chatml_workdir, tmp_path, capsys):
    import transformers

    out_dir = tmp_path / "hf"
    status, out, err = run(capsys, "export-hf", chatml_workdir, out_dir)
    assert status == 0 and "with its chat template, stops on ids [4095, 4097]" in out, err
    assert json.loads((out_dir / "generation_config.json").read_text())["eos_token_id"] == [4095, 4097]

    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    for messages in CONVERSATIONS:
        theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        ids, mask = chat.encode_chat(messages, chatml_workdir)
        assert (list(theirs["input_ids"]), list(theirs["assistant_masks"])) == (ids, mask)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
        assert list(getattr(prompt, "input_ids", prompt)) == chat.encode_chat(messages[:-1], chatml_workdir,
                                                                              add_generation_prompt=True)[0]
    assert tokenizer.decode([4097]) == "<|im_end|>" and tokenizer.eos_token_id == 4095

    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.generation_config.eos_token_id == [4095, 4097]
    config, params = checkpoint.load_model(chatml_workdir)
    from phi_jax.model import Phi

    ids = chat.encode_chat(CONVERSATIONS[1], chatml_workdir)[0]
    import torch

    with torch.no_grad():
        their_logits = model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(Phi(config).apply({"params": params}, np.asarray([ids], np.int32)))
    np.testing.assert_allclose(ours, their_logits, atol=2e-4)

    generator = transformers.pipeline("text-generation", model=str(out_dir))
    reply = generator(CONVERSATIONS[0][:1], max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert [m["role"] for m in reply] == ["user", "assistant"]
    assert generator("def add(a, b):", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("def add")


def test_the_model_card_says_what_the_model_is_and_how_it_was_made(workdir, tmp_path, capsys):
    results = {"tasks": {"arc_easy": {"metric": "acc", "metrics": {"acc": 0.625, "acc_norm": 0.5}, "num_docs": 8,
                                      "step": 2}}}
    run_dir = tmp_path / "run"
    shutil.copytree(workdir, run_dir)
    (run_dir / "eval_results.json").write_text(json.dumps(results))
    status, _, err = run(capsys, "export-hf", run_dir, tmp_path / "hf", "--chat_template", "phi", "--dtype",
                         "bfloat16")
    assert status == 0, err
    card = (tmp_path / "hf" / "README.md").read_text()
    config, _ = checkpoint.load_model(run_dir)
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    facts = [f"| parameters | {config.num_params:,} |", "| layers | 1 |", "| vocabulary | 4160 rows, tokenizer 4096",
             "PhiForCausalLM`, bfloat16", "- mixture `default`: default_",
             "2 steps of 8 x 32 tokens (concat packing): 512 tokens", "| arc_easy | acc | 0.6250 | 8 | 2 |",
             "Replies end with `<|endoftext|>` (4095)", "'ASSISTANT:'"]
    for fact in facts:
        assert fact in card, fact
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == chat.PHI_TEMPLATE
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert (list(theirs["input_ids"]), list(theirs["assistant_masks"])) == chat.encode_chat(messages, run_dir,
                                                                                                 "phi")


def test_a_params_checkpoint_keeps_its_tokenizer_config_and_a_bad_pairing_writes_nothing(workdir, tmp_path, capsys):
    params_ckpt = tmp_path / "ckpt"
    checkpoint.save_params(params_ckpt, *checkpoint.load_model(workdir))
    shutil.copy(workdir / "tokenizer.json", params_ckpt)
    phi_like = {"tokenizer_class": "CodeGenTokenizer", "eos_token": "<|endoftext|>", "model_max_length": 2048,
                "add_prefix_space": False}
    (params_ckpt / "tokenizer_config.json").write_text(json.dumps(phi_like))
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    status, out, err = run(capsys, "export-hf", params_ckpt, tmp_path / "hf", "--chat_template", template)
    assert status == 0, err
    written = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert written == {**phi_like, "chat_template": template.read_text()}
    assert "## Training" not in (tmp_path / "hf" / "README.md").read_text()

    big = tmp_path / "big"
    shutil.copytree(params_ckpt, big)
    chat.add_tokens(big / "tokenizer.json", [f"<extra_{i}>" for i in range(70)], big / "tokenizer.json")
    status, _, err = run(capsys, "export-hf", big, tmp_path / "hf2")
    assert status == 2 and "has 4166 ids but the model's vocab_size is 4160" in err
    status, _, err = run(capsys, "export-hf", params_ckpt, tmp_path / "hf3", "--step", "3")
    assert status == 2 and "is not a training workdir" in err
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf3").exists()


def test_end_of_turn_ids_are_the_special_token_after_a_reply(chatml_workdir):
    tokenizer = Tokenizer(chatml_workdir / "tokenizer.json")
    assert end_of_turn_ids(tokenizer, None) == [4095]
    assert end_of_turn_ids(tokenizer, chat.PHI_TEMPLATE) == [4095]
    assert end_of_turn_ids(tokenizer, chat.CHATML_TEMPLATE) == [4095, 4097]
    plain_text = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_ids(tokenizer, plain_text) == [4095]
    with pytest.raises(chat.ChatError, match="does not appear in what it renders"):
        end_of_turn_ids(tokenizer, "{{ messages[0]['content'] }}")


def test_the_operative_config_is_read_with_its_macros(tmp_path):
    path = tmp_path / "config.gin"
    path.write_text("# Macros:\nBATCH_SIZE = 8\nDATA_DIR = None\nMIXTURE = 'phi15'\n\n"
                    "TrainConfig.batch_size = %BATCH_SIZE\nTrainConfig.data_dir = %DATA_DIR\n"
                    "TrainConfig.mixture = %MIXTURE\nTrainConfig.model = @tiny()\n"
                    "OptimizerConfig.learning_rate = 0.002\n")
    assert read_operative_config(path) == {"TrainConfig.batch_size": 8, "TrainConfig.data_dir": None,
                                           "TrainConfig.mixture": "phi15", "TrainConfig.model": "@tiny()",
                                           "OptimizerConfig.learning_rate": 0.002}


# --------------------------------------------------------------------------------------------- phi-jax chat


def test_chat_replies_equal_transformers_on_the_export_turn_after_turn(chatml_workdir, tmp_path, capsys):
    import torch
    import transformers

    system, turns = "Be brief.", ["What is 2 + 2?", "And 3 + 3?"]
    status, out, err = run(capsys, "chat", chatml_workdir, "--system", system, "--message", turns[0], "--message",
                           turns[1], "--max_new_tokens", 6)
    assert status == 0, err
    replies = out.splitlines()
    assert len(replies) == 2

    assert run(capsys, "export-hf", chatml_workdir, tmp_path / "hf")[0] == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": system}]
    for turn, reply in zip(turns, replies):
        messages.append({"role": "user", "content": turn})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
        with torch.no_grad():
            new = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in (4095, 4097)), len(new))]
        assert reply == tokenizer.decode(new).strip()
        messages.append({"role": "assistant", "content": reply})


def test_chat_stops_at_the_end_of_turn_and_reads_turns_from_stdin(chatml_workdir, tmp_path, capsys, monkeypatch):
    import io

    config, params = checkpoint.load_model(chatml_workdir)
    # A model whose every reply is <|im_end|> at once: the reply is empty, not max_new_tokens of text.
    params["lm_head"]["bias"] = params["lm_head"]["bias"].at[4097].add(1e3)
    eager = tmp_path / "eager"
    checkpoint.save_params(eager, config, params)
    for name in ("tokenizer.json", chat.TEMPLATE_FILE):
        shutil.copy(chatml_workdir / name, eager)
    status, out, err = run(capsys, "chat", eager, "--message", "Hi", "--max_new_tokens", 20)
    assert status == 0 and out == "\n", (out, err)

    alone = [run(capsys, "chat", chatml_workdir, "--message", text, "--max_new_tokens", 5)[1] for text in ("A", "B")]
    too_long = " ".join(["word"] * 600)  # past the tiny model's 512 positions: said, and the chat goes on
    monkeypatch.setattr("sys.stdin", io.StringIO(f"A\n/reset\n{too_long}\nB\n/exit\nnot read\n"))
    status, out, err = run(capsys, "chat", chatml_workdir, "--max_new_tokens", 5)
    assert status == 0 and out == alone[0] + alone[1], err
    assert "error: the conversation is" in err and "the model's whole context" in err
    status, _, err = run(capsys, "chat", tmp_path, "--tokenizer", chatml_workdir / "tokenizer.json", "--message", "x")
    assert status == 2 and "no chat template" not in err and "not a training workdir" in err
    plain = tmp_path / "plain"
    shutil.copytree(chatml_workdir, plain, ignore=shutil.ignore_patterns(chat.TEMPLATE_FILE))
    status, _, err = run(capsys, "chat", plain, "--message", "x")
    assert status == 2 and "no chat template" in err and "--chat_template" in err


# --------------------------------------------------------------------------------------------- phi-jax eval ifeval


def test_eval_ifeval_replies_through_the_run_template_and_scores_with_lm_eval(chatml_workdir, tmp_path, capsys):
    from phi_jax.evaluation import ifeval
    from phi_jax.generate import complete

    docs = [{"key": 7, "prompt": "Write one word, in lower case.", "kwargs": [{}],
             "instruction_id_list": ["change_case:english_lowercase"]},
            {"key": 9, "prompt": "Say hi without commas.", "kwargs": [{}, {"keywords": ["hi"]}],
             "instruction_id_list": ["punctuation:no_comma", "keywords:existence"]}]
    data = tmp_path / "data"
    (data / "ifeval").mkdir(parents=True)
    (data / "ifeval" / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    config, params = checkpoint.load_model(chatml_workdir)
    tokenizer = Tokenizer(chatml_workdir / "tokenizer.json")

    def through_template(prompt):
        return chat.encode_chat([{"role": "user", "content": prompt}], chatml_workdir, add_generation_prompt=True)[0]

    for flags, prompt_ids, stop_ids in (((), through_template, [4097]), (("--chat_template", "none"), tokenizer.encode,
                                                                          [])):
        out_dir = tmp_path / f"out{len(flags)}"
        status, out, err = run(capsys, "eval", "ifeval", "--checkpoint", chatml_workdir, "--data_dir", data,
                               "--max_new_tokens", 5, "--output_dir", out_dir, *flags)
        assert status == 0, err
        assert "| ifeval | prompt_level_strict_acc |" in out and "| - | - |" in out
        records = [json.loads(line) for line in (out_dir / "eval_ifeval.jsonl").read_text().splitlines()]
        for doc, record in zip(docs, records):
            reply = complete(config, params, [prompt_ids(doc["prompt"])], 5, batch_size=1, eos_id=4095,
                             stop_ids=stop_ids)[0]
            assert record["completion"] == tokenizer.decode(reply)
        utils = ifeval.checkers()[0]
        checks = [utils.process_results(doc, [r["completion"]]) for doc, r in zip(docs, records)]
        flat = [x for c in checks for x in c["inst_level_strict_acc"]]
        metrics = json.loads((out_dir / "eval_results.json").read_text())["tasks"]["ifeval"]["metrics"]
        assert metrics["prompt_level_strict_acc"] == sum(c["prompt_level_strict_acc"] for c in checks) / 2
        assert metrics["inst_level_strict_acc"] == sum(flat) / len(flat)
