"""phi-jax eval's multiple-choice tasks against lm-eval-harness itself (the release pinned in setup.cfg's
test extra), offline.

For each task a few documents are written in the hub dataset's record format (the dataset lm-eval's task
config names). lm-eval's own task config, pointed at those files, and its evaluator run with a scripted
model; our `harness.evaluate_task` runs on the same files with the same scripted scores. Both must ask for
the same (context, continuation) strings, split them into the same tokens, and turn the same fake
log-likelihoods into the same acc and acc_norm, document by document and over the task (MMLU: over its
subjects, as lm-eval's group weights them).

lm-eval is imported unconditionally: without it this module fails to import, it never skips.
"""

import hashlib
import json
import pathlib

import datasets
import huggingface_hub.constants
import lm_eval
import lm_eval.evaluator
import pytest
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

from phi_jax.data.tokenizer import train_byte_level_bpe
from phi_jax.evaluation import harness, tasks

LM_EVAL_TASKS = pathlib.Path(lm_eval.__file__).parent / "tasks"
# our task -> (lm-eval's folder under lm_eval/tasks, its task name)
LM_EVAL_NAMES = {
    "arc_easy": ("arc", "arc_easy"), "arc_challenge": ("arc", "arc_challenge"),
    "boolq": ("super_glue/boolq", "boolq"), "piqa": ("piqa", "piqa"), "siqa": ("siqa", "social_iqa"),
    "hellaswag": ("hellaswag", "hellaswag"), "winogrande": ("winogrande", "winogrande"),
    "openbookqa": ("openbookqa", "openbookqa"),
}
MMLU_FOLDER = "mmlu/default"
SCORED_METRICS = ("acc", "acc_norm")

# Each list mixes the cases where a prompt could drift: trailing spaces and newlines, template-looking
# braces, quotes and backslashes, numeric answer labels, an odd number of choices, an empty choice (never
# the first document's: lm-eval inspects the first document's choices when it builds the task).
ARC_DOCS = [
    {"id": "Mercury_1", "question": "Which object is the biggest?  ",
     "choices": {"text": ["a cat", "an elephant in the room", "a mouse", "a dog"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "Mercury_2", "question": "Pick {{x}} & <b>'it'</b>\n",
     "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}, "answerKey": "3"},
    {"id": "Mercury_3", "question": "What \"boils\" at 100 C?",
     "choices": {"text": ["water", "iron", "salt", "glass", "sand"], "label": ["A", "B", "C", "D", "E"]},
     "answerKey": "A"},
    {"id": "Mercury_4", "question": "Which is a gas at room temperature?",
     "choices": {"text": ["oxygen", "gold", "wood", "ice"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
]
DOCS = {
    "arc_easy": ARC_DOCS,
    "arc_challenge": ARC_DOCS[::-1],
    "boolq": [  # super_glue's boolq, the dataset lm-eval reads
        {"question": "is the sky blue", "passage": "The sky is blue on a clear day.", "idx": 0, "label": 1},
        {"question": "can fish fly?", "passage": "Most fish swim.\nSome glide. ", "idx": 1, "label": 0},
        {"question": "is {{this}} 'quoted'", "passage": "A \"quoted\" passage\\ here.", "idx": 2, "label": 1},
    ],
    "piqa": [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Hit it with a hammer.", "label": 0},
        {"goal": "Dry wet hair ", "sol1": " Use a towel", "sol2": "", "label": 1},
        {"goal": "Keep {{food}} cold", "sol1": "Put it in the 'fridge'", "sol2": "Put it in the oven", "label": 0},
    ],
    "siqa": [  # lighteval/siqa
        {"context": "Kai ate a big lunch.", "question": "Why did Kai do this?", "answerA": "He was hungry",
         "answerB": "He was sad", "answerC": "He was bored", "label": "1"},
        {"context": "Sam's \"friend\" left.", "question": "How would Sam feel?", "answerA": "it's fine",
         "answerB": "lonely\\sad", "answerC": "{{happy}}", "label": "2"},
        {"context": "Alex won. ", "question": "What will Alex want to do next?", "answerA": "celebrate",
         "answerB": "sleep", "answerC": "cry", "label": "3"},
    ],
    "hellaswag": [  # Rowan/hellaswag
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
         "endings": [", the man adds wax to the windshield.", " [title] Use a scraper.  [step] Scrape  hard.",
                     ", the man stops.", "  gets out of the car. "],
         "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "indomain", "label": "3"},
        {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a plant [title] Fill a can.",
         "ctx_b": "", "ctx": "[header] How to water a plant [title] Fill a can. ",
         "endings": ["[step] Pour slowly.", "Shout at it.", "[substeps] Wait  a week.", "Eat the soil."],
         "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"},
        {"ind": 9, "activity_label": "Cooking", "ctx_a": "A man stirs a pot.", "ctx_b": "he",
         "ctx": "A man stirs a pot. he", "endings": ["adds salt.", "leaves.", "sings {{loudly}}.", "sleeps."],
         "source_id": "activitynet~v_2", "split": "val", "split_type": "indomain", "label": "1"},
    ],
    "winogrande": [  # winogrande_xl
        {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
         "option2": "the table", "answer": "2"},
        {"sentence": "Sarah gave Maria a book because _'s birthday was today.", "option1": "Sarah",
         "option2": "Maria", "answer": "2"},
        {"sentence": "The trophy doesn't fit in the suitcase because _ is too big.", "option1": "the trophy",
         "option2": "the suitcase", "answer": "1"},
        {"sentence": "I poured water from the bottle into the cup until _ was full.", "option1": "the bottle",
         "option2": "the cup", "answer": "2"},
    ],
    "openbookqa": [  # allenai/openbookqa, main
        {"id": "7-980", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                              "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
        {"id": "7-584", "question_stem": "When standing miles away from Mount Rushmore ",
         "choices": {"text": ["the mountains seem very close", "the mountains are boring",
                              "the mountains look the same as from up close", "the mountains seem smaller"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
        {"id": "9-1180", "question_stem": "A \"magnet\" attracts {{which}}",
         "choices": {"text": ["wood", "iron", "glass", "paper"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    ],
}

# cais/mmlu. Our loader reads the "all" config (every subject in one split, a `subject` field on each
# record); lm-eval runs one task per subject config. The "all" dev split below interleaves subjects to
# show that each subject's shots keep that subject's order; lm-eval's per-subject files are cut from it.
# (That the hub's "all" splits list each subject in its own config's order is assumed, not checked here.)
MMLU_SUBJECTS = {"abstract_algebra": 1, "high_school_physics": 2, "us_foreign_policy": 3}  # test docs each


def _mmlu_doc(subject, question, answer):
    return {"question": question, "subject": subject, "choices": [f"{subject} a", "b {x}", "c 'q'", "d\\"],
            "answer": answer}


MMLU_DEV = [_mmlu_doc(subject, f" Dev question {i} of {subject}? ", (i + len(subject)) % 4)
            for i in range(3) for subject in MMLU_SUBJECTS]
MMLU_TEST = [_mmlu_doc(subject, f"Test question {i} about {subject.replace('_', ' ')}?\n", (3 * i + 1) % 4)
             for subject, count in MMLU_SUBJECTS.items() for i in range(count)]


# ------------------------------------------------------------------------------------------------
# fake log-likelihoods: a function of the tokens only, so both sides agree exactly when they ask alike


def _digest(context_ids, continuation_ids) -> bytes:
    return hashlib.sha256(json.dumps([list(context_ids), list(continuation_ids)]).encode()).digest()


def distinct_scores(context_ids, continuation_ids) -> tuple[float, bool]:
    digest = _digest(context_ids, continuation_ids)
    return -(int.from_bytes(digest[:8], "big") % 10**6) / 1000.0 - 0.001, bool(digest[8] & 1)


def tied_scores(context_ids, continuation_ids) -> tuple[float, bool]:
    """Only three values, so choices tie often: both sides must break ties alike."""
    digest = _digest(context_ids, continuation_ids)
    return -float(digest[0] % 3 + 1), bool(digest[8] & 1)


def short_wins_scores(context_ids, continuation_ids) -> tuple[float, bool]:
    """Short continuations score far higher: an empty choice (a lone space) wins acc_norm unless its zero
    length is treated as lm-eval treats it."""
    return -float(len(continuation_ids)) ** 3, len(continuation_ids) == 1


SCORERS = (distinct_scores, tied_scores, short_wins_scores)


class ScriptedLM(TemplateLM):
    """lm-eval's own request tokenization (TemplateLM) over our tokenizer, with scripted scores; it keeps
    every request and the token pair lm-eval made of it, in order."""

    def __init__(self, tokenizer, score):
        super().__init__()
        self.encoder, self.score = tokenizer, score
        self.requests, self.token_pairs = [], []

    @property
    def eot_token_id(self):
        return self.encoder.eos_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.encoder.encode(string)

    def loglikelihood(self, requests, disable_tqdm=False):
        self.requests += requests
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, **kwargs):
        self.token_pairs += [(context, continuation) for _, context, continuation in requests]
        return [self.score(context, continuation) for _, context, continuation in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError("choice tasks ask for log-likelihoods only")

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError("choice tasks ask for log-likelihoods only")


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub: the datasets lm-eval loads are local JSON files."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        # Both libraries read the variables when imported, which may have happened already.
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE trained on the documents themselves, so tokens merge across the
    context/continuation boundary and a wrong split shows."""
    corpus = [json.dumps(doc) for docs in DOCS.values() for doc in docs] + [json.dumps(MMLU_DEV + MMLU_TEST)]
    corpus += ["Question: Answer: The following are multiple choice questions (with answers) about"] * 5
    return train_byte_level_bpe(corpus * 5, 600, tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="module")
def reference():
    """lm-eval's own index of the tasks' configs (includes resolved)."""
    folders = sorted({folder for folder, _ in LM_EVAL_NAMES.values()} | {MMLU_FOLDER})
    return TaskManager(include_path=[str(LM_EVAL_TASKS / f) for f in folders], include_defaults=False).task_index


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def metric_list():
    """lm-eval lists only some metrics per task (boolq, siqa, winogrande, mmlu: acc); its
    process_results computes acc_norm the same way for every choice task once asked for it."""
    return [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in SCORED_METRICS]


def local_task_config(entry, split_files: dict, cache_dir, **overrides) -> dict:
    """lm-eval's config of `entry` reading `split_files` ({split: path}, the split it scores first) through
    datasets' json builder. The splits it would load but never use here (train; validation beside a test
    split: the zero-shot tasks' unused few-shot pool) are dropped."""
    scored = next(iter(split_files))
    return {"include": str(entry.yaml_path), "task": entry.name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {s: str(p) for s, p in split_files.items()}, "cache_dir": str(cache_dir)},
            "training_split": None, "validation_split": None, "test_split": None,
            "test_split" if scored == "test" else "validation_split": scored, "metric_list": metric_list(),
            **overrides}


# ------------------------------------------------------------------------------------------------
# running both sides


def run_lm_eval(configs, name, tokenizer, score, config_dir) -> tuple[dict, ScriptedLM]:
    """lm-eval's evaluator on the task or group `name` defined by `configs` (written as YAML task files)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for config in configs:
        (config_dir / f"{config.get('task', config.get('group'))}.yaml").write_text(yaml.safe_dump(config))
    manager = TaskManager(include_path=str(config_dir), include_defaults=False)
    lm = ScriptedLM(tokenizer, score)
    results = lm_eval.evaluator.evaluate(lm=lm, task_dict=manager.load([name]), bootstrap_iters=0,
                                         log_samples=True, verbosity="ERROR")
    return results, lm


def run_ours(monkeypatch, name, tokenizer, score, data_dir) -> tuple[dict, list[dict], list]:
    pairs_seen = []

    def scripted(config, params, pairs, batch_size=16):
        pairs_seen.extend(pairs)
        return [score(context, continuation) for context, continuation in pairs]

    monkeypatch.setattr(harness, "loglikelihoods", scripted)
    result, records = harness.evaluate_task(name, None, None, tokenizer, data_dir)
    return result, records, pairs_seen


def compare(ours, theirs, lm_eval_units, reported_name):
    """ours: (result, records, token pairs) of harness.evaluate_task; theirs: (lm-eval results, ScriptedLM).
    lm_eval_units: [(lm-eval task name, number of its documents)] in the order our file lists them."""
    result, records, our_pairs = ours
    lm_eval_results, lm = theirs
    offsets, start = {}, 0
    for task_name, count in lm_eval_units:
        offsets[task_name], start = start, start + count
    our_requests = {(r["idx"], r["choice"]): (r["inputs"], r["targets"]) for r in records}
    their_requests = {(offsets[req.task_name] + req.doc_id, req.idx): tuple(req.args) for req in lm.requests}
    assert our_requests == their_requests
    our_tokens = {(r["idx"], r["choice"]): pair for r, pair in zip(records, our_pairs)}
    their_tokens = {(offsets[req.task_name] + req.doc_id, req.idx): pair
                    for req, pair in zip(lm.requests, lm.token_pairs)}
    assert our_tokens == their_tokens

    their_per_doc = {offsets[task_name] + sample["doc_id"]: {m: sample[m] for m in SCORED_METRICS}
                     for task_name, samples in lm_eval_results["samples"].items() for sample in samples}
    our_per_doc = {}
    for idx in sorted({r["idx"] for r in records}):
        doc_records = [r for r in records if r["idx"] == idx]
        our_per_doc[idx] = tasks.choice_metrics(doc_records, [r["loglikelihood"] for r in doc_records])
    assert our_per_doc == their_per_doc
    their_metrics = {m: lm_eval_results["results"][reported_name][f"{m},none"] for m in SCORED_METRICS}
    assert result["metrics"] == pytest.approx(their_metrics, rel=1e-12, abs=0)


def lm_eval_split(entry) -> str:
    """The split lm-eval scores: its test split where it has one, else validation."""
    return entry.cfg.get("test_split") or entry.cfg["validation_split"]


# ------------------------------------------------------------------------------------------------


# lm-eval divides the empty piqa choice's log-likelihood by its zero length (to -inf, never picked).
@pytest.mark.filterwarnings("ignore:divide by zero encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("name", sorted(LM_EVAL_NAMES))
def test_zero_shot_tasks_ask_and_score_as_lm_eval(name, tokenizer, reference, tmp_path, monkeypatch):
    task = tasks.TASKS[name]
    entry = reference[LM_EVAL_NAMES[name][1]]
    assert lm_eval_split(entry) == task.split
    assert task.metric in [m["metric"] for m in entry.cfg["metric_list"]], "the paper's metric is lm-eval's"
    data_file = tmp_path / "data" / task.dirs[0] / f"{task.split}.jsonl"
    write_jsonl(data_file, DOCS[name])
    config = local_task_config(entry, {task.split: data_file}, tmp_path / "hf_cache")
    for score in SCORERS:
        theirs = run_lm_eval([config], entry.name, tokenizer, score, tmp_path / "lm_eval_tasks")
        ours = run_ours(monkeypatch, name, tokenizer, score, tmp_path / "data")
        compare(ours, theirs, [(entry.name, len(DOCS[name]))], entry.name)


def test_mmlu_two_shot_from_dev_asks_and_scores_as_lm_eval(tokenizer, reference, tmp_path, monkeypatch):
    """Our 2 shots are the first two dev documents of the subject, as lm-eval's first_n sampler takes them
    from the subject's dev split; lm-eval's mmlu group averages its subjects weighted by their sizes, which
    is the mean over all documents that we report."""
    task = tasks.TASKS["mmlu"]
    group = reference["mmlu"].cfg
    assert lm_eval_split(reference["mmlu_abstract_algebra"]) == task.split
    for subject in MMLU_SUBJECTS:
        config = reference[f"mmlu_{subject}"].cfg
        assert (config["fewshot_split"], config["fewshot_config"]["sampler"]) == ("dev", "first_n")
    # mmlu averages its four category groups, each averaging its subjects, all weighted by size: one
    # weighted mean over the subjects, which is the group the test builds.
    groups = [name for name, entry in reference.items() if name.startswith("mmlu") and entry.kind.name == "GROUP"]
    assert len(groups) == 5
    for group_name in groups:
        assert [(m["metric"], m["weight_by_size"]) for m in reference[group_name].cfg["aggregate_metric_list"]] == [
            ("acc", True)]
    data = tmp_path / "data" / task.dirs[0]
    write_jsonl(data / "dev.jsonl", MMLU_DEV)
    write_jsonl(data / "test.jsonl", MMLU_TEST)
    configs = []
    for subject in MMLU_SUBJECTS:
        split_files = {"test": tmp_path / "lm_eval_data" / subject / "test.jsonl",
                       "dev": tmp_path / "lm_eval_data" / subject / "dev.jsonl"}
        write_jsonl(split_files["test"], [d for d in MMLU_TEST if d["subject"] == subject])
        write_jsonl(split_files["dev"], [d for d in MMLU_DEV if d["subject"] == subject])
        configs.append(local_task_config(reference[f"mmlu_{subject}"], split_files, tmp_path / "hf_cache",
                                         num_fewshot=tasks.MMLU_SHOTS))
    weighted = [{**m, "metric": name} for m in group["aggregate_metric_list"] for name in SCORED_METRICS]
    configs.append({"group": "mmlu", "task": [c["task"] for c in configs], "aggregate_metric_list": weighted})
    for score in SCORERS:
        theirs = run_lm_eval(configs, "mmlu", tokenizer, score, tmp_path / "lm_eval_tasks")
        ours = run_ours(monkeypatch, "mmlu", tokenizer, score, tmp_path / "data")
        compare(ours, theirs, [(f"mmlu_{s}", n) for s, n in MMLU_SUBJECTS.items()], "mmlu")


def test_every_mmlu_subject_has_lm_eval_s_description(reference, tmp_path):
    """The line naming the subject that opens each prompt, for all of lm-eval's MMLU subjects (the test
    above runs three of them end to end)."""
    descriptions = {entry.cfg["dataset_name"]: entry.cfg["description"] for name, entry in reference.items()
                    if name.startswith("mmlu_") and entry.kind.name == "TASK"}
    assert len(descriptions) == 57
    data = tmp_path / "data" / "mmlu"
    question = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 0}
    write_jsonl(data / "dev.jsonl", [{**question, "subject": "none of them"}])
    write_jsonl(data / "test.jsonl", [{**question, "subject": subject} for subject in descriptions])
    prompts = [ex["inputs"] for ex in tasks.examples("mmlu", tmp_path / "data") if ex["choice"] == 0]
    assert prompts == [description + "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:" for description in descriptions.values()]


def test_request_tokens_split_as_lm_eval_splits_them(tokenizer):
    """harness.encode_pair against lm-eval's TemplateLM on the edge cases the tasks above may not reach."""
    requests = [("Question: Is it?\nAnswer:", " yes"),
                ("The cat sat on the ", "mat"),        # trailing spaces move to the continuation
                ("Ends with a newline\n", "next"),     # so does any trailing whitespace
                ("Tab\t ", " x"),
                ("", "The cat sat"),                   # empty context: the end-of-text token
                ("", "<|endoftext|>The cat sat")]      # ... unless the continuation starts with it
    lm = ScriptedLM(tokenizer, distinct_scores)
    lm.loglikelihood([Instance("loglikelihood", {}, request, idx=0) for request in requests])
    assert [harness.encode_pair(tokenizer, c, t) for c, t in requests] == lm.token_pairs
