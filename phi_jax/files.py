"""Reading and writing files: paths on a filesystem (a URL is refused), writes that a failure never
leaves half done, and a bad line reported with its file and line number."""

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import uuid


def local_path(path) -> pathlib.Path:
    """`path` as a pathlib.Path, refusing a URL (gs://, s3://, ...): pathlib reads gs://b/run as the
    local directory gs:/b/run, so a run would silently land on this machine's disk."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(path))
    if match:
        raise ValueError(f"{str(path)!r}: {match.group(1)}:// URLs are not supported; give a path on a mounted "
                         "filesystem instead (e.g. the bucket mounted with gcsfuse, or a shared NFS directory)")
    return pathlib.Path(path)


@contextlib.contextmanager
def atomic_directory(path, overwrite: bool = False):
    """Yields a temporary directory beside `path`; on success it becomes `path`.

    On any exception the temporary directory is removed and `path` is untouched. An existing `path`
    is refused unless `overwrite`, and then replaced only once the new one is complete.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; choose a new output directory or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside `path` that becomes `path` when the block succeeds and is removed
    when it fails: a reader or a crash sees the old file or the new one, never half of one.

    The name is unique to this writer: hosts share output directories, and with a fixed temporary
    name one host renames away the file another is about to rename. The file gets the usual (umask)
    permissions, not mkstemp's owner-only ones, since others read what a run prepares or writes.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

def read_json_lines(path) -> list[tuple[int, object]]:
    """(line number, JSON value) of each non-blank line of `path`, so that a caller can name the line
    of a value it rejects; a line that is not JSON is an error naming the file and line."""
    path = pathlib.Path(path)
    values = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                values.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON value ({e})") from None
    return values
