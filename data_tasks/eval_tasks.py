"""seqio Tasks `phi_eval_<task>` for the phi-1.5 paper's benchmarks (phi_jax.evaluation.tasks).

    import data_tasks.eval_tasks
    data_tasks.eval_tasks.register("/data/eval")                # None: $PHI_JAX_EVAL_DATA_DIR
    task = seqio.get_mixture_or_task("phi_eval_arc_easy")
    ds = task.get_dataset(split="test", shuffle=False, sequence_length=None)
    task.score_metric_fns / task.predict_metric_fns              # phi_jax.evaluation.tasks' metrics

Examples are text, untokenized (the model's own tokenizer splits context and continuation the way
lm-eval-harness does): "inputs" and "targets" strings, "idx" (document), and for multiple choice one
example per choice with "choice", "gold" and "choice_chars" (T5's rank-classification layout; the
postprocessed target carries them to the score metric, which groups by document). The source reads
the same files, in the same order, as `phi-jax eval`, which uses phi_jax.evaluation.tasks directly
so that it also runs where TensorFlow is not installed.
"""

import functools
import os

import seqio
import tensorflow as tf

from phi_jax.evaluation import tasks

_INT_FIELDS = ("idx", "choice", "gold", "choice_chars")
_TEXT = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.string, rank=0)


def _dataset_fn(name, eval_data_dir, split, shuffle_files, seed=None):
    examples = tasks.examples(name, eval_data_dir)
    keys = tuple(examples[0])
    signature = {k: tf.TensorSpec((), tf.int32 if k in _INT_FIELDS else tf.string) for k in keys}
    return tf.data.Dataset.from_generator(lambda: ({k: ex[k] for k in keys} for ex in examples),
                                          output_signature=signature)


def _choice_target(target, example=None, is_target=False):
    """A multiple-choice target -> what choice_metrics groups by (the example's ids and lengths)."""
    if not is_target:
        return target
    return {k: int(example[k]) for k in _INT_FIELDS}


def _text(output, example=None, is_target=False):
    return output.decode() if isinstance(output, bytes) else output


def register(eval_data_dir=None) -> None:
    """Registers `phi_eval_<task>` for every benchmark, reading EVAL_DATA_DIR/<task>/ (None:
    $PHI_JAX_EVAL_DATA_DIR); registering again replaces them."""
    eval_data_dir = eval_data_dir or os.environ.get("PHI_JAX_EVAL_DATA_DIR")
    eval_data_dir = None if eval_data_dir is None else str(eval_data_dir)
    for name, task in tasks.TASKS.items():
        seqio.TaskRegistry.remove(f"phi_eval_{name}")
        seqio.TaskRegistry.add(
            f"phi_eval_{name}",
            source=seqio.FunctionDataSource(functools.partial(_dataset_fn, name, eval_data_dir), splits=[task.split]),
            preprocessors=[],
            output_features={"inputs": _TEXT, "targets": _TEXT},
            postprocess_fn=_choice_target if task.kind == "choice" else _text,
            metric_fns=[tasks.METRIC_FNS[task.kind]],
        )
