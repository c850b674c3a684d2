"""Evaluation: the phi-1.5 paper's benchmarks on a phi-jax model, and a sandbox for model-written code.

    tasks.py      the benchmarks: reading their public files, prompts, metrics (plain Python)
    harness.py    log-likelihoods and generations of a model over a task's requests; results tables
    code.py       scoring code by running it: HumanEval / MBPP / GSM8K programs, pass@k
    ifeval.py     IFEval: chat-template prompts, lm-eval's instruction checkers, offline
    sandbox.py    runs each program in its own jailed process (jail.py), in parallel

`phi-jax eval` is the command; data_tasks/eval_tasks.py registers the tasks with seqio. Nothing here
is imported by the core (model, train step, generate).
"""
