#!/usr/bin/env bash
# The core tests (`pytest -m core`) on CPU under the newest jax 0.11.x, on Python 3.13.
#
# jax 0.11 needs Python >= 3.12 and CI's venv is Python 3.11 with jax 0.10.2, so this builds, once, a
# Debian trixie root (debootstrap, python3.13) holding a venv with the lent GPU machines' JAX stack:
# jax/jaxlib 0.11.x (CPU), flax, optax, orbax-checkpoint, chex, safetensors, numpy, pytest,
# pytest-xdist, tqdm (there through transformers), and tensorboardX, which the training loop's
# MetricsWriter imports (the checkpoint tests train through phi_jax.trainer.train; the GPU machines
# lack it). No tensorflow, seqio, grain, gin, torch, transformers: a core test that imports one of
# them fails here.
# The root is cached in .newest_jax/ (git-ignored) and reused; an unfinished or outdated one is
# rebuilt (built in a temporary directory, then renamed).
# The checkout is bind-mounted read-only at /src and put on PYTHONPATH (nothing is installed from it).
#
# The tests: `pytest -m core` over the test modules that carry the `core` mark (grep), which import only
# the JAX stack at module level: test_core_imports (the core imports with TensorFlow, seqio, grain and
# gin blocked), test_model, test_attention, test_attention_variants, test_kernel_bounds (interpret
# mode, lowering for cuda and tpu), the train-step, sharding and compile-only tests of test_train,
# test_checkpoint's restore and failed-save tests, and test_generate's tests on a model of its own
# (sampling frequencies, top-k, one compilation, the KV cache written in place, bad arguments). Left out:
#   test_generate.py's transformers comparisons (its CLI tests among them), test_hf.py: they need
#                                 transformers/torch
#   test_train.py's loop tests:   they feed grain iterators (or the default mixture: the data edge)
#   test_checkpoint.py's kill -9 / SIGTERM tests: `phi-jax train` runs a gin experiment
#   test_data, test_eval*, test_cli, test_launch, test_multihost_train, test_bench, test_sandbox:
#                                 the data/eval edge, the CLI and the launchers, not the core
# Skipped tests are not passes: the run fails if any selected test is skipped.
#
# Usage: .ci/newest_jax.sh [pytest args, default: -n 2]   (make test-newest-jax)
# Needs root, debootstrap (apt-get install debootstrap) and a Debian mirror (the first http(s)
# debian URI in apt's sources, or DEBIAN_MIRROR=...); pip reaches the registry this machine's pip
# uses (its cert, index-url, http(s) extra-index-url). NEWEST_JAX_DIR=... moves the cache.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${NEWEST_JAX_DIR:-$REPO/.newest_jax}
ROOT=$CACHE/root
SUITE=trixie
PYTHON=python3.13
# Changing this list (or the suite) rebuilds the root.
REQUIREMENTS=("jax>=0.11,<0.12" "jaxlib>=0.11,<0.12" flax optax orbax-checkpoint chex safetensors numpy ml_dtypes
              tqdm tensorboardX pytest pytest-xdist)
SPEC="$SUITE $PYTHON ${REQUIREMENTS[*]}"
STAMP=.phi_jax_newest_jax  # in the root, written last: its spec, then the versions installed

log() { printf '[newest_jax %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"
[ "$#" -gt 0 ] || set -- -n 2

# ---- mounts: every mount this script makes is under $CACHE; all are undone on exit -----------------

mounts_under() {  # the mount points at or below $1, deepest first
    local dir
    dir=$(realpath -m "$1")
    findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1' | sort -r
}

unmount_under() {
    local target
    while read -r target; do
        [ -n "$target" ] || continue
        umount -R "$target" 2>/dev/null || umount -lR "$target"
    done < <(mounts_under "$1")
}

remove_tree() {  # never rm -rf through a mount (the checkout is bind-mounted inside a root)
    [ -e "$1" ] || return 0
    unmount_under "$1"
    [ -z "$(mounts_under "$1")" ] || die "refusing to remove $1: something is still mounted under it"
    rm -rf --one-file-system "$1"
}

mount_system() {  # /proc, /dev (with /dev/shm, /dev/pts) and /sys in the root at $1
    mkdir -p "$1/proc" "$1/dev" "$1/sys"
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    mount --make-rslave "$1/dev"
    mount -t sysfs -o ro sysfs "$1/sys"
}

cleanup() {
    local status=$?
    unmount_under "$CACHE" || status=1
    exit "$status"
}
on_signal() {  # stop the tests too (they run in the background so that a signal is seen at once)
    if [ -n "${tests_pid:-}" ]; then  # the test run's own process group: pytest and its xdist workers
        kill -TERM -- "-$tests_pid" 2>/dev/null || kill -TERM "$tests_pid" 2>/dev/null || true
        wait "$tests_pid" 2>/dev/null || true
    fi
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

[ "$(realpath -m "$CACHE")" != / ] || die "NEWEST_JAX_DIR must not be /"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -n 9 || { log "waiting for another run (lock $CACHE/.lock)"; flock 9; }
unmount_under "$CACHE"  # left by a run that was killed

# ---- the root ----------------------------------------------------------------------------------------

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local file files=()
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] && files+=("$file")
    done
    [ "${#files[@]}" -gt 0 ] || return 0
    # deb822 "URIs: ..." lines and one-line "deb [opts] URI suite ..." entries; the main archive, not security.
    { grep -hE '^\s*URIs:' "${files[@]}" | sed -E 's/^\s*URIs:\s*//' | tr ' ' '\n'
      grep -hE '^\s*deb\s' "${files[@]}" | sed -E 's/^\s*deb\s+(\[[^]]*\]\s+)?//' | awk '{print $1}'
    } | grep -E '^https?://' | grep -i debian | grep -v -- '-security' | head -n 1 || true
}

host_ca_bundle() {  # the file pip's `cert` names: the registries are reached through this machine's CA
    local cert=${PIP_CERT:-}
    [ -n "$cert" ] || cert=$(pip3 config get global.cert 2>/dev/null || true)
    [ -n "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
    [ -f "$cert" ] || die "no CA bundle at $cert (pip's cert)"
    echo "$cert"
}

write_pip_conf() {  # the host pip's registry settings; file:// indexes are host paths and are left out
    local value urls=()
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        echo "disable-pip-version-check = true"
        echo "default-timeout = ${PIP_DEFAULT_TIMEOUT:-180}"
        value=${PIP_INDEX_URL:-$(pip3 config get global.index-url 2>/dev/null || true)}
        case "$value" in http://*|https://*) echo "index-url = $value" ;; esac
        value=${PIP_EXTRA_INDEX_URL:-$(pip3 config get global.extra-index-url 2>/dev/null || true)}
        for value in $value; do
            case "$value" in http://*|https://*) urls+=("$value") ;; esac
        done
        [ "${#urls[@]}" = 0 ] || echo "extra-index-url = ${urls[*]}"
    } > "$1/etc/pip.conf"
}

root_is_ready() {  # (venv/bin/python links to /usr/bin/python3.13 inside the root: test the target there)
    [ -x "$ROOT/usr/bin/$PYTHON" ] && [ -f "$ROOT/venv/pyvenv.cfg" ] && [ -f "$ROOT/$STAMP" ] &&
        [ "$(head -n 1 "$ROOT/$STAMP")" = "$SPEC" ]
}

build_root() {
    local mirror cert build started=$SECONDS
    command -v debootstrap >/dev/null || die "debootstrap is not installed: apt-get install debootstrap"
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR=http://..."
    cert=$(host_ca_bundle)
    for build in "$CACHE"/build.*; do remove_tree "$build"; done  # unfinished builds
    build=$(mktemp -d "$CACHE/build.XXXXXX")
    chmod 755 "$build"
    log "debootstrap $SUITE with $PYTHON from $mirror into $build"
    debootstrap --variant=minbase --include="$PYTHON,$PYTHON-venv,ca-certificates" "$SUITE" "$build" "$mirror" \
        > "$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    cp "$cert" "$build/etc/ssl/certs/ca-certificates.crt"
    cp -L /etc/resolv.conf "$build/etc/resolv.conf" 2>/dev/null || true
    write_pip_conf "$build"
    mount_system "$build"
    log "venv with ${REQUIREMENTS[*]}"
    chroot "$build" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin LANG=C.UTF-8 "$PYTHON" -m venv /venv
    chroot "$build" /usr/bin/env -i HOME=/root PATH=/venv/bin:/usr/bin:/bin LANG=C.UTF-8 \
        /venv/bin/pip install --quiet --cert /etc/ssl/certs/ca-certificates.crt --upgrade pip
    chroot "$build" /usr/bin/env -i HOME=/root PATH=/venv/bin:/usr/bin:/bin LANG=C.UTF-8 \
        /venv/bin/pip install --quiet --cert /etc/ssl/certs/ca-certificates.crt "${REQUIREMENTS[@]}"
    mkdir -p "$build/src"
    { echo "$SPEC"
      chroot "$build" /venv/bin/python -c 'import sys, importlib.metadata as m
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "safetensors", "tqdm",
             "tensorboardX", "pytest"):
    print(name, m.version(name))'
    } > "$build/$STAMP.tmp"
    mv "$build/$STAMP.tmp" "$build/$STAMP"
    unmount_under "$build"
    remove_tree "$ROOT"
    mv "$build" "$ROOT"
    log "root built in $((SECONDS - started)) s"
}

if root_is_ready; then
    log "reusing $ROOT"
else
    [ ! -e "$ROOT" ] || log "$ROOT is unfinished or outdated: rebuilding it"
    build_root
fi
log "$(tail -n +2 "$ROOT/$STAMP" | tr '\n' ' ')"

# ---- the tests -----------------------------------------------------------------------------------------

mount_system "$ROOT"
mkdir -p "$ROOT/src"
mount --bind "$REPO" "$ROOT/src"
mount -o remount,bind,ro "$ROOT/src"
rm -f "$ROOT/tmp/core-junit.xml"
mapfile -t modules < <(cd "$REPO" && grep -l -E 'pytest\.mark\.core\b' tests/test_*.py)
[ "${#modules[@]}" -gt 0 ] || die "no test module carries the core mark"
log "pytest -m core $* ${modules[*]} (in the chroot)"
started=$SECONDS
setsid chroot "$ROOT" /usr/bin/env -i -C /src HOME=/root PATH=/venv/bin:/usr/bin:/bin LANG=C.UTF-8 PYTHONPATH=/src \
    PYTHONDONTWRITEBYTECODE=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 ${PHI_TEST_SEED:+PHI_TEST_SEED=$PHI_TEST_SEED} \
    /venv/bin/python -m pytest -p no:cacheprovider -m core --junitxml=/tmp/core-junit.xml "$@" "${modules[@]}" &
tests_pid=$!
status=0
wait "$tests_pid" || status=$?
tests_pid=
log "pytest exited $status after $((SECONDS - started)) s"
[ -f "$ROOT/tmp/core-junit.xml" ] || die "pytest wrote no report"
# A skipped core test did not run: that is a failure here, not a pass.
chroot "$ROOT" /venv/bin/python - "$status" <<'EOF'
import sys, xml.etree.ElementTree as ET
suites = ET.parse("/tmp/core-junit.xml").getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
print(f"[newest_jax] core tests: {passed} passed, {count['failures']} failed, {count['errors']} errors, "
      f"{count['skipped']} skipped")
status = int(sys.argv[1])
if count["skipped"]:
    print("[newest_jax] error: a skipped core test is not a pass (see the skip reasons above)", file=sys.stderr)
sys.exit(status or (1 if count["skipped"] or not passed else 0))
EOF
