"""Runs one Python program in a jail: `python -I -S jail.py SETTINGS_JSON < program.py`.

Started by phi_jax.evaluation.sandbox (one process per program); standard library only, so that it
starts in milliseconds and runs on any machine. With "isolate" true, the program runs:

- in new user, mount, network, PID, IPC and UTS namespaces (no network: the new network namespace
  has only a loopback device, and it is down; the PID namespace dies with the program's first process);
- as an unprivileged user: when we are root, inside uid 1 = host uid 65534 (nobody), so RLIMIT_NPROC
  binds (the kernel never applies it to host root); otherwise our own uid, capabilities dropped;
- with every mount read-only, a fresh size-limited tmpfs at /tmp as its scratch (and working)
  directory, empty tmpfs over /run (local sockets), and its own /proc;
- under RLIMIT_AS / CPU / NPROC / FSIZE / NOFILE / CORE and a wall-clock limit, after which the whole
  PID namespace is killed.

If any of this cannot be set up, it prints `jail: <what failed>` on stderr and exits with 97, before
running anything. Without "isolate" it runs the program in a temporary directory under the same
resource limits and nothing else (the sandbox's --allow_unsandboxed). Exit status: the program's, or
128 + signal, or 124 when the wall clock ran out.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

SETUP_FAILED, TIMED_OUT = 97, 124
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 1 << 14, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # 442 on every architecture
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 8, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 38, 47, 2
# noroot (locked), no setuid fixup (locked), keep-caps off (locked)
SECUREBITS = 0b101111
CAP_DAC_READ_SEARCH = 2
NOBODY = 65534
SCRATCH = "/tmp"

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _mount(source, target, fstype, flags, data=None):
    _check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                      data and data.encode()), f"mount {fstype or source} on {target}")


def _set_caps(caps: set):
    """Effective, permitted and inheritable sets all become `caps`."""
    mask = sum(1 << c for c in caps)
    data = (_CapData * 2)(_CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, mask & 0xFFFFFFFF),
                          _CapData(mask >> 32, mask >> 32, mask >> 32))
    _check(libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data), "capset")


def _all_caps() -> set:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return set(range(int(f.read()) + 1))


def _setup_mounts(settings):
    """In the new mount namespace: everything read-only, a fresh /tmp (scratch) and /run, /proc."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
           "mount_setattr(/, read-only, recursive) (needs Linux 5.12+)")
    owner = settings["inner_uid"]
    _mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={settings['scratch_bytes']},mode=0700,uid={owner},gid={owner}")
    for hidden in ("/run", "/var/run"):
        if os.path.isdir(hidden) and not os.path.islink(hidden):
            _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0555")


def _limit(settings):
    for name, value in (("RLIMIT_AS", settings["memory_bytes"]), ("RLIMIT_CPU", settings["cpu_seconds"]),
                        ("RLIMIT_NPROC", settings["max_processes"]), ("RLIMIT_FSIZE", settings["max_file_bytes"]),
                        ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_privileges(settings):
    """Inside uid 0 (all capabilities of the new namespace) -> inside uid `inner_uid`, keeping at
    most CAP_DAC_READ_SEARCH (when the interpreter is not world-readable), for good: root can
    not get them back by exec (securebits), the bounding set holds no more, no new privileges."""
    keep = {CAP_DAC_READ_SEARCH} if settings["read_search"] else set()
    uid = settings["inner_uid"]
    if uid != 0:
        _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(KEEPCAPS)")
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        _set_caps(_all_caps())
    for cap in sorted(_all_caps() - keep):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(CAPBSET_DROP, {cap})")
    _check(libc.prctl(PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0), "prctl(SET_SECUREBITS)")
    _set_caps(keep)
    for cap in keep:
        _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "prctl(CAP_AMBIENT_RAISE)")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def _exec_program(settings, path, workdir):
    os.chdir(workdir)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    python = settings["python"]
    os.execve(python, [python, "-I", path], env)


def _status(wait_status):
    return os.waitstatus_to_exitcode(wait_status) if os.WIFEXITED(wait_status) else 128 + os.WTERMSIG(wait_status)


def _wait(pid, timeout):
    """The child's exit status, or None when `timeout` seconds pass first."""
    pidfd = os.pidfd_open(pid)
    ready = select.select([pidfd], [], [], timeout)[0]
    os.close(pidfd)
    if not ready:
        return None
    return _status(os.waitpid(pid, 0)[1])


def _fail(message):
    print(f"jail: {message}", file=sys.stderr, flush=True)
    os._exit(SETUP_FAILED)


def _jailed_child(settings, program, go_read, ready_write):
    """The first process in the new namespaces: finishes the setup, then starts the program as pid 1."""
    try:
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
               "unshare(user, mount, net, pid, ipc, uts namespaces)")
        os.write(ready_write, b"ok")
        if os.read(go_read, 2) != b"ok":
            os._exit(SETUP_FAILED)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        if settings["outer_uid"] == 0:
            os.setgroups([])
        _setup_mounts(settings)
        path = os.path.join(SCRATCH, "main.py")
        with open(path, "wb") as f:
            f.write(program)
        os.chown(path, settings["inner_uid"], settings["inner_uid"])
    except (SetupError, OSError) as e:
        os.write(ready_write, f"{e}".encode()[:500] or b"?")
        os._exit(SETUP_FAILED)
    pid = os.fork()
    if pid == 0:  # pid 1 of the new PID namespace
        try:
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except SetupError:
                pass  # a container that masks parts of /proc: keep the host's, read-only
            _limit(settings)
            _drop_privileges(settings)
            _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
            os.close(ready_write)
            _exec_program(settings, path, SCRATCH)
        except (SetupError, OSError) as e:
            os.write(ready_write, f"{e}".encode()[:500] or b"?")
        os._exit(SETUP_FAILED)
    os.close(ready_write)
    os._exit(_status(os.waitpid(pid, 0)[1]))


def run_isolated(settings, program: bytes) -> int:
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_read)
        os.close(go_write)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        _jailed_child(settings, program, go_read, ready_write)
    os.close(ready_write)
    os.close(go_read)
    reply = os.read(ready_read, 512)
    if reply != b"ok":
        os.waitpid(pid, 0)
        _fail(reply.decode(errors="replace") or "the jailed process died during setup")
    outer, inner = settings["outer_uid"], settings["inner_uid"]
    try:
        if outer == 0:  # inside 0 = host root (for the setup), inside `inner` = nobody (the program)
            mapping = f"0 0 1\n{inner} {NOBODY} 1\n"
            gid_mapping = mapping
        else:  # an unprivileged user can map only itself, and must deny setgroups to map its group
            mapping, gid_mapping = f"0 {outer} 1\n", f"0 {os.getegid()} 1\n"
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(mapping)
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(gid_mapping)
    except OSError as e:
        os.kill(pid, signal.SIGKILL)
        _fail(f"writing the user namespace's id maps: {e}")
    os.write(go_write, b"ok")
    status = _wait(pid, settings["timeout"])
    if status is None:
        os.kill(pid, signal.SIGKILL)  # its child, pid 1 of the namespace, follows (PDEATHSIG), then all others
        os.waitpid(pid, 0)
        return TIMED_OUT
    error = b""
    while chunk := os.read(ready_read, 512):
        error += chunk
    if status == SETUP_FAILED and error:
        _fail(error.decode(errors="replace"))
    return status


def run_unsandboxed(settings, program: bytes) -> int:
    import shutil
    import tempfile

    workdir = tempfile.mkdtemp(prefix="phi_jax_unsandboxed_")
    try:
        path = os.path.join(workdir, "main.py")
        with open(path, "wb") as f:
            f.write(program)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            _limit(settings)
            _exec_program(settings, path, workdir)
        status = _wait(pid, settings["timeout"])
        if status is None:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return TIMED_OUT
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass
        return status
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    settings = json.loads(sys.argv[1])
    program = sys.stdin.buffer.read()
    run = run_isolated if settings["isolate"] else run_unsandboxed
    try:
        sys.exit(run(settings, program))
    except SetupError as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
