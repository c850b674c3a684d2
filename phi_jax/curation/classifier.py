"""The quality classifier of `phi-jax data filter train|apply`, as phi-1 built its code filter: a
logistic regression over features of each document, trained on a language model's grades.

Features are either a phi-jax checkpoint's hidden states (the last block's output, mean-pooled over
the first MAX_TOKENS tokens: phi-1's recipe, our model in place of their pretrained one) or hashed
word 1- and 2-grams (scikit-learn's HashingVectorizer, no model needed). The classifier is a
directory: `classifier.skops` (the scikit-learn estimator, in skops' format, which loads without
running pickled code: only the scikit-learn and numpy types in TRUSTED load) and `classifier.json`
(features, checkpoint, tokenizer, the grade from which a document counts as good).
"""

import dataclasses
import json
import logging

import numpy as np

from phi_jax.curation.records import CorpusError
from phi_jax.files import atomic_directory, local_path, read_json_lines

logger = logging.getLogger(__name__)

MAX_TOKENS = 512
EMBED_BATCH = 8
HASHED_FEATURES = 2 ** 18
ESTIMATOR_FILE, CONFIG_FILE = "classifier.skops", "classifier.json"
TRUSTED = ("sklearn.pipeline.Pipeline", "sklearn.feature_extraction.text.HashingVectorizer",
           "sklearn.feature_extraction.text.TfidfTransformer", "sklearn.linear_model._logistic.LogisticRegression",
           "sklearn.preprocessing._data.StandardScaler", "numpy.dtype", "numpy.ndarray", "builtins.slice",
           "numpy.float64", "numpy.int64", "builtins.float", "builtins.int")


@dataclasses.dataclass
class Classifier:
    estimator: object        # scikit-learn: features -> P(good)
    features: str            # "ngrams" or "embeddings"
    min_score: float         # grades at or above it were the positive class
    checkpoint: str | None = None
    tokenizer: str | None = None
    _model: tuple | None = dataclasses.field(default=None, repr=False)

    def featurize(self, texts: list[str]):
        if self.features == "ngrams":
            return texts  # the pipeline hashes them itself
        if self._model is None:
            self._model = load_embedder(self.checkpoint, self.tokenizer)
        return embed(texts, *self._model)

    def scores(self, texts: list[str]) -> np.ndarray:
        """P(good) of each text."""
        return self.estimator.predict_proba(self.featurize(texts))[:, 1]

    def save(self, path) -> None:
        import skops.io

        with atomic_directory(local_path(path), overwrite=True) as tmp:
            skops.io.dump(self.estimator, tmp / ESTIMATOR_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps({"features": self.features, "min_score": self.min_score,
                                                       "checkpoint": self.checkpoint, "tokenizer": self.tokenizer}))


def load(path) -> Classifier:
    import skops.io

    path = local_path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / ESTIMATOR_FILE).is_file():
        raise CorpusError(f"{path}: not a classifier from `phi-jax data filter train` "
                          f"(expected {CONFIG_FILE} and {ESTIMATOR_FILE})")
    untrusted = [t for t in skops.io.get_untrusted_types(file=path / ESTIMATOR_FILE) if t not in TRUSTED]
    if untrusted:
        raise CorpusError(f"{path / ESTIMATOR_FILE}: holds types a classifier never has: {', '.join(untrusted)}")
    estimator = skops.io.load(path / ESTIMATOR_FILE, trusted=list(TRUSTED))
    return Classifier(estimator, **json.loads((path / CONFIG_FILE).read_text()))


def load_embedder(checkpoint, tokenizer=None):
    """(params, tokenizer, jitted mean-pooling forward) for `embed`."""
    import jax

    from phi_jax.checkpoint import load_model
    from phi_jax.data.tokenizer import resolve_tokenizer
    from phi_jax.model import Phi

    if checkpoint is None:
        raise CorpusError("--features embeddings needs --checkpoint (a phi-jax or Hugging Face checkpoint)")
    tok = resolve_tokenizer(tokenizer, checkpoint)
    config, params = load_model(checkpoint)

    @jax.jit
    def mean_hidden(params, tokens_BxT, mask_BxT):
        hidden_BxTxD = Phi(config).apply({"params": params}, tokens_BxT, return_hidden=True)
        weights_BxT = mask_BxT.astype(hidden_BxTxD.dtype)
        return (hidden_BxTxD * weights_BxT[..., None]).sum(1) / weights_BxT.sum(1, keepdims=True).clip(1)

    return params, tok, mean_hidden


def embed(texts: list[str], params, tokenizer, mean_hidden) -> np.ndarray:
    """[N, D] mean-pooled hidden states; lengths padded up to a power of two, so few shapes compile."""
    out = []
    for i in range(0, len(texts), EMBED_BATCH):
        ids = [tokenizer.encode(t)[:MAX_TOKENS] or [tokenizer.eos_id] for t in texts[i:i + EMBED_BATCH]]
        length = 1 << max(len(x) for x in ids).bit_length()
        tokens_BxT = np.zeros((EMBED_BATCH, min(length, MAX_TOKENS)), np.int32)
        mask_BxT = np.zeros(tokens_BxT.shape, bool)
        for row, x in enumerate(ids):
            tokens_BxT[row, :len(x)], mask_BxT[row, :len(x)] = x, True
        out.append(np.asarray(mean_hidden(params, tokens_BxT, mask_BxT), np.float32)[:len(ids)])
    return np.concatenate(out)


def read_labels(path) -> tuple[list[str], np.ndarray]:
    """(texts, grades) of a labels file (`filter label`'s output: JSON lines with "text" and "score");
    rows whose grade could not be read ("score": null) are left out."""
    texts, grades = [], []
    for line, row in read_json_lines(local_path(path)):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "score" not in row:
            raise CorpusError(f"{path}:{line}: expected an object with 'text' and 'score' (as filter label writes)")
        if row["score"] is not None:
            texts.append(row["text"])
            grades.append(float(row["score"]))
    return texts, np.array(grades)


def train(labels, out, *, features: str = "ngrams", checkpoint=None, tokenizer=None, min_score: float = 3.0,
          held_out: float = 0.2, seed: int = 0) -> dict:
    """Fits the classifier on `labels`, saves it to `out`; returns its held-out accuracy and counts."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    texts, grades = read_labels(labels)
    good = (grades >= min_score).astype(int)
    if len(set(good)) < 2 or min(np.bincount(good)) < 2:
        raise CorpusError(f"{labels}: needs at least two documents graded below {min_score} and two at or above "
                          f"it (has {int((good == 0).sum())} and {int(good.sum())})")
    if features == "ngrams":
        estimator = make_pipeline(HashingVectorizer(ngram_range=(1, 2), n_features=HASHED_FEATURES,
                                                    alternate_sign=False, norm="l2"),
                                  LogisticRegression(C=10.0, solver="liblinear", class_weight="balanced"))
    elif features == "embeddings":
        estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    else:
        raise CorpusError(f"--features {features!r}: expected ngrams or embeddings")
    classifier = Classifier(estimator, features, min_score, checkpoint and str(checkpoint), tokenizer)
    X = classifier.featurize(texts)
    indices = np.arange(len(texts))
    train_idx, test_idx = train_test_split(indices, test_size=held_out, random_state=seed, stratify=good)
    take = (lambda idx: [X[i] for i in idx]) if features == "ngrams" else (lambda idx: X[idx])
    estimator.fit(take(train_idx), good[train_idx])
    accuracy = float((estimator.predict(take(test_idx)) == good[test_idx]).mean())
    classifier.save(out)
    logger.info("filter train: %s classifier saved to %s", features, out)
    return {"train": len(train_idx), "held_out": len(test_idx), "accuracy": round(accuracy, 4),
            "good": int(good.sum()), "features": features}
