"""IFEval offline: lm-eval's instruction checkers score hand-made replies as their rules say, with nothing
fetched (the network is cut in the scoring process); NLTK's Punkt model comes from the cache, or the
instructions that need it are named and left out."""

import json
import pathlib
import subprocess
import sys

import pytest

# (document as google/IFEval has it, reply, strict result per instruction, loose result per instruction)
CASES = [
    ({"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
     "all of this is lower case.", [True], [True]),
    ({"instruction_id_list": ["length_constraints:number_sentences"],
      "kwargs": [{"relation": "less than", "num_sentences": 3}]},
     "Dr. Smith came at 5 p.m. today. He left.", [True], [True]),  # 2 sentences only if "Dr." is known
    ({"instruction_id_list": ["change_case:capital_word_frequency"],
      "kwargs": [{"capital_frequency": 2, "capital_relation": "at least"}]},
     "THIS is VERY good.", [True], [True]),
    ({"instruction_id_list": ["language:response_language"], "kwargs": [{"language": "fr"}]},
     "Bonjour, je suis très heureux de vous rencontrer aujourd'hui dans cette belle ville.", [True], [True]),
    ({"instruction_id_list": ["keywords:existence", "punctuation:no_comma"],
      "kwargs": [{"keywords": ["jax"]}, {}]},
     "I like jax, a lot.", [True, False], [True, False]),
    ({"instruction_id_list": ["startend:end_checker"],
      "kwargs": [{"end_phrase": "Is there anything else I can help with?"}]},
     "Done.\n**Is there anything else I can help with?**", [False], [True]),
]
PUNKT_TYPES = {"length_constraints:number_sentences", "change_case:capital_word_frequency"}

SCORE = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access during IFEval scoring")
socket.socket.connect = refuse
socket.create_connection = refuse
if sys.argv[1] == "no_punkt":
    sys.modules["punkt"] = None
from phi_jax.evaluation import ifeval
cases = json.loads(sys.stdin.read())
metrics, checks = ifeval.score([json.dumps(doc) for doc, _ in cases], [reply for _, reply in cases])
print(json.dumps({"metrics": metrics, "checks": checks}))
"""


def _docs():
    docs = []
    for key, (doc, reply, _, _) in enumerate(CASES):
        # As the dataset stores them: every kwargs key of every instruction, None where unused.
        kwargs = [{"num_sentences": None, "relation": None, "keywords": None, **k} for k in doc["kwargs"]]
        docs.append(({"key": 1000 + key, "prompt": f"prompt {key}", **doc, "kwargs": kwargs}, reply))
    return docs


def _score(tmp_path, mode: str) -> dict:
    env = {"PHI_JAX_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
    result = subprocess.run([sys.executable, "-c", SCORE, mode], input=json.dumps(_docs()), capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _expected(cases) -> dict:
    strict = [s for _, _, s, _ in cases]
    loose = [lo for _, _, _, lo in cases]
    flat = lambda lists: [x for item in lists for x in item]  # noqa: E731
    return {"prompt_level_strict_acc": sum(all(s) for s in strict) / len(cases),
            "inst_level_strict_acc": sum(flat(strict)) / len(flat(strict)),
            "prompt_level_loose_acc": sum(all(lo) for lo in loose) / len(cases),
            "inst_level_loose_acc": sum(flat(loose)) / len(flat(loose))}


@pytest.mark.parametrize("mode", ["punkt", "no_punkt"])
def test_replies_score_as_the_instruction_rules_say_with_nothing_fetched(tmp_path, mode):
    scored = _score(tmp_path, mode)
    kept = [c for c in CASES if mode == "punkt" or not set(c[0]["instruction_id_list"]) & PUNKT_TYPES]
    expected = _expected(kept)
    if mode == "no_punkt":
        expected["skipped_prompts"] = len(CASES) - len(kept)
    assert scored["metrics"] == pytest.approx(expected)
    by_key = {c["key"]: c for c in scored["checks"]}
    for key, (doc, _, strict, loose) in enumerate(CASES):
        if doc in [c[0] for c in kept]:
            assert by_key[1000 + key]["inst_level_strict_acc"] == strict, doc
            assert by_key[1000 + key]["inst_level_loose_acc"] == loose, doc
    punkt_tab = tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert punkt_tab.is_dir() == (mode == "punkt")
    if mode == "punkt":
        assert sorted(p.name for p in punkt_tab.iterdir()) == ["abbrev_types.txt", "collocations.tab",
                                                               "ortho_context.tab", "sent_starters.txt"]


def test_a_malformed_prompts_file_is_named(tmp_path):
    from phi_jax.evaluation import tasks

    (tmp_path / "ifeval").mkdir()
    (tmp_path / "ifeval" / "train.jsonl").write_text(json.dumps({"key": 1, "prompt": "Hi",
                                                                 "instruction_id_list": ["a", "b"],
                                                                 "kwargs": [{}]}) + "\n")
    with pytest.raises(ValueError, match=r"ifeval: the train records of .*ifeval are not in the format.*"
                                         r"document 1: 2 instructions but 1 kwargs"):
        tasks.examples("ifeval", tmp_path)
    (tmp_path / "ifeval" / "train.jsonl").write_text(json.dumps({"key": 1, "prompt": "Hi"}) + "\n")
    with pytest.raises(ValueError, match="KeyError: 'instruction_id_list'"):
        tasks.examples("ifeval", tmp_path)
