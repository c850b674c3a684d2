"""lm-eval-harness's `local-completions` model pointed at `phi-jax serve` scores documents as `phi-jax eval`
does on the same checkpoint: the same log-likelihoods, so the same acc and acc_norm per document.

lm-eval reads our tokenizer through the server's vLLM-style /tokenize endpoints (tokenizer_backend
"remote"), sends each request as token ids with echo and logprobs, and sums the continuation's token
logprobs itself. The documents and lm-eval's task configs pointed at local files are the ones
tests/test_eval_harness.py checks our prompts against.
"""

import lm_eval.evaluator
import pytest
import yaml
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from phi_jax.checkpoint import load_model
from phi_jax.data.tokenizer import Tokenizer
from phi_jax.evaluation import harness, tasks
from tests.serving import serve_process, trained_workdir
from tests.test_eval_harness import DOCS, LM_EVAL_NAMES, local_task_config, offline, reference, write_jsonl

__all__ = ["offline", "reference"]  # the fixtures this module takes from test_eval_harness

TASKS = ("arc_easy", "hellaswag", "piqa")


# lm-eval divides the empty piqa choice's log-likelihood by its zero length (to -inf, never picked).
@pytest.mark.filterwarnings("ignore:divide by zero encountered in divide:RuntimeWarning")
@pytest.mark.slow
def test_local_completions_against_the_server_scores_like_phi_jax_eval(tmp_path_factory, tmp_path, reference):
    workdir = trained_workdir(tmp_path_factory)
    config, params = load_model(workdir)
    tokenizer = Tokenizer(workdir / "tokenizer.json")
    configs, ours = {}, {}
    for name in TASKS:
        task, entry = tasks.TASKS[name], reference[LM_EVAL_NAMES[name][1]]
        data_file = tmp_path / "data" / task.dirs[0] / f"{task.split}.jsonl"
        write_jsonl(data_file, DOCS[name])
        configs[entry.name] = local_task_config(entry, {task.split: data_file}, tmp_path / "hf_cache")
        ours[entry.name] = harness.evaluate_task(name, config, params, tokenizer, tmp_path / "data")[1]
    task_dir = tmp_path / "lm_eval_tasks"
    task_dir.mkdir()
    for entry_name, task_config in configs.items():
        (task_dir / f"{entry_name}.yaml").write_text(yaml.safe_dump(task_config))

    with serve_process(workdir, args=("--max_seq_len", "512"), log_dir=tmp_path) as server:
        lm = get_model("local-completions")(base_url=f"{server.base_url}/completions", model="phi-jax",
                                            tokenizer_backend="remote", max_length=512, max_retries=1)
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        results = lm_eval.evaluator.evaluate(lm=lm, task_dict=manager.load(list(configs)), bootstrap_iters=0,
                                             log_samples=True, verbosity="ERROR")
        assert server.metrics()["requests_received"] == sum(len(r) for r in ours.values())

    for entry_name, records in ours.items():
        samples = sorted(results["samples"][entry_name], key=lambda s: s["doc_id"])
        assert len(samples) == len({r["idx"] for r in records})
        for sample in samples:
            doc = [r for r in records if r["idx"] == sample["doc_id"]]
            their_lls = [resp[0][0] for resp in sample["resps"]]
            assert their_lls == pytest.approx([r["loglikelihood"] for r in doc], abs=2e-4)
            assert tasks.choice_metrics(doc, [r["loglikelihood"] for r in doc]) == {
                "acc": sample["acc"], "acc_norm": sample["acc_norm"]}, (entry_name, sample["doc_id"])
