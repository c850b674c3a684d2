"""The embedded default corpus and tokenizer: nothing downloaded, built on first use and cached.

Three sources, like phi's data in miniature:
  code       the running Python's own standard library sources (top-level modules, about 1.5 MB)
  web        prose: the documentation text that ships with Python (`pydoc_data.topics`, the language
             reference as plain text) plus pydoc-style pages made from the stdlib modules' docstrings
  synthetic  textbook-style lessons and exercises from `phi_jax.data.synthetic` (topics x templates x
             difficulty), 2000 documents
and a chat set for instruction tuning, `chat`: CHAT_CONVERSATIONS conversations about the same
topics (`synthetic.conversations`), the `default_chat` mixture, made on its first use.
Every 20th document goes to the validation split. A byte-level BPE of VOCAB_SIZE ids (id 0 is '!',
`<|endoftext|>` is the last id, 4095) is trained on the training split with `tokenizers`, then the
`default` mixture is prepared through the same seqio tasks (data_tasks' `default_*`, reading raw_dir())
and ArrayRecord shards as user data.

The cache is $PHI_JAX_CACHE or ~/.cache/phi_jax, one directory per corpus version and Python version
(the stdlib differs between Pythons); concurrent first uses wait on a file lock.
"""

import ast
import contextlib
import fcntl
import gzip
import json
import logging
import os
import pathlib
import sys
import sysconfig
import textwrap
import time

from phi_jax.data import synthetic
from phi_jax.data.registry import DEFAULT_TASKS_MODULE
from phi_jax.files import replacing

logger = logging.getLogger(__name__)

VERSION = 2  # bump when the corpus, tokenizer or shard format changes: caches are per version
VOCAB_SIZE = 4096
CODE_BYTES = 1_500_000
PROSE_BYTES = 1_500_000
SYNTHETIC_DOCS = 2000
CHAT_CONVERSATIONS = 1000
CHAT_MAX_TOKENS = 256  # the chat set's conversations are cut after a turn to this (sft_tiny_cpu.gin's SEQ_LEN)
# Mixtures of built-in tasks only: prepared here without a DATA_DIR, each on its first use.
BUILT_IN_MIXTURES = ("default", "default_chat")
MAX_FILE_BYTES = 120_000
VALIDATION_EVERY = 20
READY = "READY"


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PHI_JAX_CACHE") or "~/.cache/phi_jax").expanduser()


def default_dir() -> pathlib.Path:
    v = sys.version_info
    return cache_root() / f"default-v{VERSION}-py{v.major}.{v.minor}.{v.micro}"


def raw_dir() -> pathlib.Path:
    return default_dir() / "raw"


def tokenizer_file() -> pathlib.Path:
    return default_dir() / "tokenizer.json"


def prepared_dir(mixture: str = "default") -> pathlib.Path:
    """Where a built-in mixture is prepared. The chat set has its own directory: its chat template (and any
    tokens a template adds) travel with its tokenizer, and the pretraining data's stays as it is."""
    return default_dir() / ("prepared" if mixture == "default" else f"prepared-{mixture}")


def _stdlib_modules():
    """(module name, source) of the stdlib's top-level modules, sorted, skipping huge and test files."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        if path.name.startswith(("_", "test")) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            yield path.stem, path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def code_documents(budget: int = CODE_BYTES) -> list[str]:
    docs, size = [], 0
    for _, source in _stdlib_modules():
        if size >= budget:
            break
        if source.strip():
            docs.append(source)
            size += len(source)
    if not docs:
        raise RuntimeError(f"no Python standard library sources under {sysconfig.get_paths()['stdlib']}")
    return docs


def _pydoc_page(name: str, source: str) -> str | None:
    """A pydoc-style plain-text page from a module's docstrings (parsed, never imported)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    doc = ast.get_docstring(tree)
    entries = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            text = ast.get_docstring(node)
            if not text:
                continue
            head = f"class {node.name}" if isinstance(node, ast.ClassDef) else f"{node.name}({ast.unparse(node.args)})"
            entries.append(f"    {head}\n{textwrap.indent(text, '        ')}\n")
    if not doc and not entries:
        return None
    page = f"NAME\n    {name}\n"
    if doc:
        page += f"\nDESCRIPTION\n{textwrap.indent(doc, '    ')}\n"
    if entries:
        page += "\nFUNCTIONS AND CLASSES\n" + "\n".join(entries)
    return page


def prose_documents(budget: int = PROSE_BYTES) -> list[str]:
    docs, size = [], 0
    try:
        from pydoc_data.topics import topics  # the language reference as text, shipped with CPython
    except ImportError:
        topics = {}
    for key in sorted(topics):
        if topics[key].strip():
            docs.append(f"{key}\n{'*' * len(key)}\n\n{topics[key].strip()}\n")
            size += len(docs[-1])
    for name, source in _stdlib_modules():
        if size >= budget:
            break
        page = _pydoc_page(name, source)
        if page:
            docs.append(page)
            size += len(page)
    return docs


def build_raw(root) -> dict[str, int]:
    """Writes root/<source>/<split>/part-00000.jsonl.gz for the three sources; returns docs per source."""
    root = pathlib.Path(root)
    sources = {"code": code_documents(), "web": prose_documents(),
               "synthetic": list(synthetic.documents(SYNTHETIC_DOCS, seed=0))}
    for source, docs in sources.items():
        _write_splits(root / source, [{"text": d} for d in docs])
    return {source: len(docs) for source, docs in sources.items()}


def build_chat(root) -> int:
    """Writes root/chat/<split>/part-00000.jsonl.gz, {"messages": [...]} a line; returns the conversations."""
    chats = [{"messages": m} for m in synthetic.conversations(CHAT_CONVERSATIONS, seed=0)]
    _write_splits(pathlib.Path(root) / "chat", chats)
    return len(chats)


def _write_splits(directory: pathlib.Path, records: list[dict]) -> None:
    for split in ("train", "validation"):
        keep = [r for i, r in enumerate(records)
                if (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == (split == "validation")]
        with replacing(directory / split / "part-00000.jsonl.gz") as tmp:
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")


def _train_texts(root):
    """The text sources' training documents (the chat set is not in the tokenizer's training data)."""
    paths = [p for source in ("code", "web", "synthetic") for p in pathlib.Path(root).glob(f"{source}/train/*.gz")]
    for path in sorted(paths):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


@contextlib.contextmanager
def _locked(directory: pathlib.Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ready(prepared: pathlib.Path, mixture: str) -> bool:
    # A cache prepared before mixtures were recorded in the prepared directory lacks the mixture file:
    # preparing again only writes it (every shard is kept).
    from phi_jax.data import shards

    return (prepared / READY).exists() and shards.mixture_path(prepared, mixture).exists()


def ensure_default(tasks_module: str = DEFAULT_TASKS_MODULE, mixture: str = "default") -> pathlib.Path:
    """The prepared directory of a built-in mixture (BUILT_IN_MIXTURES), building corpus, chat set,
    tokenizer and shards if missing (the shards through the tasks module's `default_*` tasks)."""
    prepared = prepared_dir(mixture)
    if _ready(prepared, mixture):
        return prepared
    with _locked(default_dir()):
        if _ready(prepared, mixture):
            return prepared
        start = time.time()
        logger.info(f"building the built-in {mixture} data in {default_dir()} (once)")
        if not (raw_dir() / READY).exists():
            counts = build_raw(raw_dir())
            (raw_dir() / READY).write_text(json.dumps(counts))
            logger.info(f"  corpus: {counts} documents")
        if not tokenizer_file().exists():
            from phi_jax.data.tokenizer import train_byte_level_bpe

            tok = train_byte_level_bpe(_train_texts(raw_dir()), VOCAB_SIZE, tokenizer_file())
            logger.info(f"  tokenizer: byte-level BPE, {tok.vocab_size} ids, eos {tok.eos_id}")
        # After the tokenizer, which _train_texts trains on the text sources only.
        if mixture == "default_chat" and not (raw_dir() / "chat" / READY).exists():
            count = build_chat(raw_dir())
            (raw_dir() / "chat" / READY).write_text(str(count))
            logger.info(f"  chat set: {count} conversations")
        from phi_jax.data.prepare import prepare

        limits = {"max_tokens": CHAT_MAX_TOKENS} if mixture == "default_chat" else {}
        prepare(mixture, out_dir=prepared, tasks_module=tasks_module, **limits)
        (prepared / READY).write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        logger.info(f"  {mixture} ready in {time.time() - start:.0f}s")
    return prepared
