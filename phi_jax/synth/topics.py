"""Topics: reading a topics file, reading web documents, and making topics from them.

A topics file is plain text (one topic a line) or JSON lines (`{"topic": ..., "subtopics": [...]}`,
optionally `"seed_ids"`: the web documents the topic was found in, whose extracts its prompts then use).
`phi-jax data topics` writes the JSONL form, with `documents` (how many web documents the topic covers)
and `terms` (its salient terms).
"""

import dataclasses
import gzip
import json
import logging
import pathlib
import re

from phi_jax.synth import SynthError

log = logging.getLogger(__name__)

SEED_DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclasses.dataclass(frozen=True)
class Topic:
    name: str
    subtopics: tuple[str, ...] = ()
    seed_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SeedDocument:
    seed_id: str  # "relative/path.jsonl:line"
    text: str


def _string_list(value, where: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SynthError(f"{where}: \"{field}\" must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _topic_of_json(line: str, where: str) -> Topic:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SynthError(f"{where}: not a JSON object ({e})") from None
    if isinstance(obj, str):
        obj = {"topic": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("topic"), str) or not obj["topic"].strip():
        raise SynthError(f"{where}: expected an object with a non-empty string \"topic\"")
    return Topic(obj["topic"].strip(), _string_list(obj.get("subtopics"), where, "subtopics"),
                 _string_list(obj.get("seed_ids"), where, "seed_ids"))


def read_topics(path) -> list[Topic]:
    """The topics of a .jsonl file (objects with "topic", optional "subtopics" and "seed_ids") or of a
    text file (one topic a line; blank lines and lines starting with # are skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SynthError(f"--topics {path}: no such file")
    topics, seen = [], set()
    jsonl = path.suffix == ".jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        topic = _topic_of_json(line, f"{path}:{number}") if jsonl else Topic(line)
        if topic.name in seen:
            raise SynthError(f"{path}:{number}: topic {topic.name!r} appears twice")
        seen.add(topic.name)
        topics.append(topic)
    if not topics:
        raise SynthError(f"--topics {path}: the file has no topics (expected one topic a line, or JSON lines "
                         f"with a \"topic\" field)")
    return topics


def write_topics(path, topics: list[dict]) -> None:
    from phi_jax.files import replacing

    with replacing(path) as tmp:
        tmp.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in topics), encoding="utf-8")


def _seed_files(root: pathlib.Path) -> list[pathlib.Path]:
    if not root.is_dir():
        raise SynthError(f"--seed_data {root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(SEED_DATA_SUFFIXES))
    if not files:
        raise SynthError(f"--seed_data {root}: no {', '.join(SEED_DATA_SUFFIXES)} files in it")
    return files


def read_seed_documents(root) -> list[SeedDocument]:
    """Every document of the JSON lines files under `root` (each line an object with a string "text"),
    in a stable order; a line without one is an error naming its file and line."""
    root = pathlib.Path(root)
    documents = []
    for path in _seed_files(root):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SynthError(f"{where}: not a JSON object ({e})") from None
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise SynthError(f"{where}: no string field \"text\" (each line of --seed_data must be a "
                                     f"JSON object with the document in \"text\")")
                if text.strip():
                    documents.append(SeedDocument(f"{path.relative_to(root)}:{number}", text))
    if not documents:
        raise SynthError(f"--seed_data {root}: every document is empty")
    return documents


def extract(text: str, max_chars: int) -> str:
    """The start of `text`, at most `max_chars` characters, cut at a word boundary."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]
    return (head.rsplit(" ", 1)[0] if " " in head else "") or text[:max_chars]


def tfidf_features(texts: list[str]):
    """(sparse TF-IDF matrix, vocabulary array) with English stop words dropped."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True, max_features=50_000,
                                 token_pattern=r"(?u)\b[^\W\d_][\w-]{2,}\b")
    try:
        matrix = vectorizer.fit_transform(texts)
    except ValueError as e:  # every document was stop words or numbers
        raise SynthError(f"--seed_data: no words to cluster on ({e})") from None
    return matrix, vectorizer.get_feature_names_out()


def hidden_state_embeddings(config, params, tokenizer, texts: list[str], max_tokens: int = 256,
                            batch_size: int = 16):
    """Each text's mean-pooled last hidden state of a phi-jax model [N, D] (unit length), from its
    first `max_tokens` tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from phi_jax.model import Phi

    max_tokens = min(max_tokens, config.max_position_embeddings)
    model = Phi(config)
    hidden = jax.jit(lambda p, t: model.apply({"params": p}, t, return_hidden=True))
    rows = []
    for start in range(0, len(texts), batch_size):
        chunk = [tokenizer.encode(t)[:max_tokens] or [tokenizer.eos_id] for t in texts[start:start + batch_size]]
        chunk += [chunk[0]] * (batch_size - len(chunk))
        tokens_BxT = np.zeros((batch_size, max_tokens), np.int32)
        mask_BxT = np.zeros((batch_size, max_tokens), np.float32)
        for r, ids in enumerate(chunk):
            tokens_BxT[r, :len(ids)], mask_BxT[r, :len(ids)] = ids, 1
        h_BxTxD = hidden(params, jnp.asarray(tokens_BxT))
        mean_BxD = (h_BxTxD * mask_BxT[..., None]).sum(1) / mask_BxT.sum(1, keepdims=True)
        rows.append(np.asarray(mean_BxD)[:min(batch_size, len(texts) - start)])
    embeddings_NxD = np.concatenate(rows)
    return embeddings_NxD / np.maximum(np.linalg.norm(embeddings_NxD, axis=1, keepdims=True), 1e-12)


def cluster_topics(documents: list[SeedDocument], num_topics: int, *, seed: int = 0, embeddings_NxD=None,
                   num_terms: int = 3) -> list[dict]:
    """Topics found by k-means over the documents (their TF-IDF vectors, or `embeddings_NxD`), each named
    by the salient terms of its documents (the largest mean TF-IDF weights), largest cluster first:
    [{"topic", "terms", "documents", "seed_ids"}]."""
    import numpy as np
    from sklearn.cluster import KMeans

    if num_topics > len(documents):
        raise SynthError(f"--num_topics {num_topics}: more than the {len(documents)} documents of --seed_data")
    tfidf_NxV, vocabulary = tfidf_features([d.text for d in documents])
    features = tfidf_NxV if embeddings_NxD is None else embeddings_NxD
    labels_N = KMeans(n_clusters=num_topics, random_state=seed, n_init=4).fit_predict(features)
    topics, used = [], set()
    for cluster in np.argsort(-np.bincount(labels_N, minlength=num_topics), kind="stable"):
        members = np.flatnonzero(labels_N == cluster)
        if not len(members):
            continue
        weights_V = np.asarray(tfidf_NxV[members].mean(axis=0)).ravel()
        terms = [str(vocabulary[i]) for i in np.argsort(-weights_V, kind="stable")[:num_terms] if weights_V[i] > 0]
        name = " / ".join(terms) or f"cluster {cluster}"
        while name in used:  # two clusters with the same leading terms stay two topics
            name += f" ({cluster})"
        used.add(name)
        topics.append({"topic": name, "terms": terms, "documents": int(len(members)),
                       "seed_ids": [documents[i].seed_id for i in members]})
    return topics


LABEL_PROMPT = ("Here are the beginnings of {n} web documents about one topic:\n\n{extracts}\n\n"
                "The topic they share, as a short textbook chapter title:")


def _ask(generator, prompts: list[str]) -> list:
    """The completion (or None, failed) of each prompt, in order."""
    from phi_jax.synth.generators import Request

    replies = {}
    generator.check()
    generator.run([Request(f"ask-{i}", p) for i, p in enumerate(prompts)],
                  lambda request, completion, error: replies.__setitem__(request.id, (completion, error)))
    for i, prompt in enumerate(prompts):
        if replies[f"ask-{i}"][0] is None:
            log.warning("%s...: %s", prompt[:60], replies[f"ask-{i}"][1])
    return [replies[f"ask-{i}"][0] for i in range(len(prompts))]


def label_with_generator(found: list[dict], documents: list[SeedDocument], generator, *, per_topic: int = 3,
                         chars: int = 300) -> int:
    """Renames each clustered topic by the generator's title for extracts of its first `per_topic`
    documents; a topic whose request failed, or whose title is empty or taken, keeps its terms' name.
    Returns how many kept it."""
    by_id = {d.seed_id: d for d in documents}
    prompts = []
    for topic in found:
        extracts = [extract(by_id[s].text, chars) for s in topic["seed_ids"][:per_topic]]
        prompts.append(LABEL_PROMPT.format(n=len(extracts), extracts="\n\n".join(f"- {e}" for e in extracts)))
    kept, used = 0, set()
    for topic, completion in zip(found, _ask(generator, prompts)):
        lines = [line.strip().strip("\"'#*").strip() for line in (completion.text if completion else "").splitlines()]
        title = next((line for line in lines if line), "")
        if not 2 < len(title) <= 80 or title in used:
            kept += 1
            used.add(topic["topic"])
            continue
        used.add(title)
        topic["topic"] = title
    return kept


SUBTOPIC_PROMPT = ("Here is a list of {n} distinct subtopics of \"{topic}\" that a textbook chapter on it "
                   "would cover, one per line:\n1.")


def parse_subtopics(text: str, n: int, topic: str) -> list[str]:
    """The first `n` distinct items of a generated list ("1. a", "- b", "c" one per line)."""
    items = []
    for line in ("1." + text).splitlines():
        item = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", line).strip().strip("\"'").rstrip(".")
        if 2 < len(item) < 120 and item.lower() != topic.lower() and item not in items:
            items.append(item)
    return items[:n]


def expand_subtopics(topics: list[dict], generator, n: int) -> int:
    """Fills each topic's "subtopics" with up to `n` items the generator lists; returns how many topics
    got none (their request failed, or the reply was no list: they keep their topic alone)."""
    completions = _ask(generator, [SUBTOPIC_PROMPT.format(n=n, topic=t["topic"]) for t in topics])
    empty = 0
    for topic, completion in zip(topics, completions):
        topic["subtopics"] = parse_subtopics(completion.text, n, topic["topic"]) if completion else []
        if not topic["subtopics"]:
            empty += 1
            log.warning("topic %r: no subtopics", topic["topic"])
    return empty
