"""Tokenizers: a byte-level BPE trained locally (the embedded default) and loading any other.

The embedded tokenizer is what the offline default pipeline uses: no hub access is needed, it is
trained in a second or two on the synthetic task's train split plus a paragraph of general English,
and cached on disk. Its properties:

* byte-level BPE whose vocabulary contains all 256 byte symbols, so *any* UTF-8 text (real GSM8K,
  Dolly, emoji, Chinese) encodes and decodes losslessly: ``decode(encode(t)) == t``;
* every digit is its own pre-token (``Digits(individual_digits=True)``, as in Llama), so numbers are
  spelled digit by digit and never merged;
* no prefix space is added, and encoding inserts no BOS/EOS; the dataset code appends
  ``<|endoftext|>`` (eos) explicitly after each response; ``<|pad|>`` pads on the right.

The saved folder is a plain ``transformers`` tokenizer folder: ``AutoTokenizer.from_pretrained(path)``
loads it in a Python that never imports ``rlkd_cli``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from rlkd_cli.data.identity import fingerprint
from rlkd_cli.errors import RlkdError
from rlkd_cli.io import atomic_dir, file_lock

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MODEL_MAX_LENGTH = 1_000_000
EMBEDDED_TRAIN_ROWS = 20000
EMBEDDED_SEED = 1234

# How many times train_bpe_tokenizer ran in this process (tests check that the cache is reused).
TRAIN_COUNT = 0

# General English and punctuation so that common words and symbols get merges too.
_GENERAL_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns from a larger one: the teacher
shows which words are likely next, and the student tries to rank them in the same order. What is
the answer? Write a short response that completes the request, and explain your reasoning step by
step. Below is an instruction that describes a task, paired with an input that provides further
context. Summarize the following article in one sentence. It was a sunny day in the city of London,
and people walked to work, to school, or to the market; some took the bus (number 12), others the
train. "Why?" she asked. "Because it's faster," he said -- and they both laughed! Prices rose by 5%
in 2023, from $1,250 to $1,312.50. Instruction: Input: Response: Summary: Question: Answer:
This is an example of a text with new lines,
tabs\tand    several spaces; brackets [like these], braces {and these}, and symbols: # @ & * + = / \\ | < > ~ ^ _.
"""


def _chunks(texts: Iterable[str], size: int = 1000):
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Pre-tokenization: split every digit into its own piece, then GPT-2 style byte-level splitting
    without a prefix space. The vocabulary is ``[<|endoftext|>, <|pad|>] + 256 byte symbols +
    merges`` up to ``vocab_size`` (which must leave room for the 258 fixed entries). It can end
    smaller when the corpus runs out of pairs to merge (the embedded tokenizer has about 930
    entries for vocab_size=1024): size models by ``len(tokenizer)``, not by ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    global TRAIN_COUNT
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise RlkdError(f"tokenizer vocab_size={vocab_size} is too small; it must be at least {len(alphabet) + 2}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    TRAIN_COUNT += 1
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def embedded_tokenizer_dir(cache_dir: str | os.PathLike, vocab_size: int = 1024,
                           num_rows: int = EMBEDDED_TRAIN_ROWS) -> Path:
    """Where :func:`embedded_tokenizer` caches its folder."""
    from rlkd_cli.data.synthetic import GENERATOR_VERSION

    name = f"synthetic-v{GENERATOR_VERSION}-{vocab_size}"
    if num_rows != EMBEDDED_TRAIN_ROWS:
        name += f"-n{num_rows}"
    return Path(cache_dir).expanduser() / "tokenizers" / name


def _is_complete(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def embedded_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 1024, *,
                       num_rows: int = EMBEDDED_TRAIN_ROWS):
    """The embedded tokenizer, trained once and cached at
    ``<cache_dir>/tokenizers/synthetic-v{GENERATOR_VERSION}-{vocab_size}/``.

    Training corpus: ``num_rows`` rows of the synthetic train split (seed fixed), rendered as
    ``"Question: {question}\\nAnswer: {answer}"``, plus a built-in paragraph of general English.
    The folder is built under an inter-process lock and renamed into place complete, so concurrent
    callers train it once and never see half a folder. ``num_rows`` other than the default (used by
    tests for speed) gets its own cache folder.
    """
    from transformers import PreTrainedTokenizerFast

    path = embedded_tokenizer_dir(cache_dir, vocab_size, num_rows)
    if not _is_complete(path):
        with file_lock(path.parent / f".{path.name}.lock"):
            if not _is_complete(path):
                from rlkd_cli.data.synthetic import generate_splits

                rows = generate_splits(num_rows, 0, 0, seed=EMBEDDED_SEED)["train"]
                texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
                texts.extend(_GENERAL_TEXT.splitlines() * 20)
                log.info("training the embedded tokenizer (vocab %d) into %s", vocab_size, path)
                tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
                with atomic_dir(path) as tmp:
                    tok.save_pretrained(str(tmp))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return False


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def load_tokenizer(name_or_path: str | os.PathLike, *,
                   config_key: str = "student.name_or_path (or teacher.name_or_path)"):
    """``AutoTokenizer.from_pretrained`` for a hub id or a local folder, never with remote code.

    Honours ``HF_HUB_OFFLINE`` (then only the local hub cache is used). A local folder that does
    not exist, or a hub id that cannot be fetched nor found in the cache, is an :class:`RlkdError`
    naming ``config_key`` (e.g. ``student.name_or_path``). A tokenizer without a pad token gets
    ``pad = eos``.
    """
    from transformers import AutoTokenizer

    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise RlkdError(f"cannot load tokenizer '{name}': it is a file, not a folder; "
                            f"set {config_key} to a tokenizer folder or a hub id")
        try:
            tok = AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)
        except Exception as e:
            raise RlkdError(f"cannot load tokenizer from folder '{name}' ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); it needs tokenizer.json "
                            f"or the files of a transformers tokenizer") from e
    else:
        if _looks_like_path(name):
            raise RlkdError(f"cannot load tokenizer '{name}': no such local folder; "
                            f"set {config_key} to a local folder or a hub id")
        try:
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        except Exception as e:
            where = "not in the hub cache (offline)" if _offline() else \
                "not found on the hub or the hub is unreachable, and not in the hub cache"
            raise RlkdError(f"cannot load tokenizer '{name}': no such local folder and {where}; "
                            f"set {config_key} to a local folder") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise RlkdError(f"tokenizer '{name}' has neither a pad nor an eos token; "
                            f"use a causal-LM tokenizer that defines eos_token")
        tok.pad_token = tok.eos_token
    return tok


def for_run(cfg, model_cfgs: list):
    """The run's tokenizer: ``tokenizer.name_or_path``, else the first pretrained model's, else a BPE of
    ``tokenizer.vocab_size`` built here: the embedded one for the embedded task, or one trained on the data
    set's train text for any other (:func:`data_tokenizer`), so models built from scratch on real text do not
    read it through merges made for the synthetic task.

    ``model_cfgs``: ``(role, model config)`` pairs, in order of preference (errors name ``<role>.name_or_path``).
    """
    from rlkd_cli.models import check_source

    for role, mc in model_cfgs:  # a missing model folder is named as the model key it is, not as a tokenizer
        if mc is not None and mc.get("name_or_path"):
            check_source(str(mc.get("name_or_path")), key=f"{role}.name_or_path")
    if cfg.tokenizer.get("name_or_path"):
        return load_tokenizer(str(cfg.tokenizer.name_or_path), config_key="tokenizer.name_or_path")
    for role, mc in model_cfgs:
        if mc is not None and mc.get("name_or_path"):
            return load_tokenizer(str(mc.get("name_or_path")), config_key=f"{role}.name_or_path")
    from rlkd_cli.data import dataset

    cache_dir = Path(os.path.expanduser(str(cfg.cache_dir)))
    if cfg.get("dataset") is not None and not dataset.is_embedded(cfg.dataset):
        return data_tokenizer(cache_dir, cfg.dataset, int(cfg.tokenizer.vocab_size))
    return embedded_tokenizer(cache_dir, int(cfg.tokenizer.vocab_size))


def data_tokenizer(cache_dir: Path, dataset_cfg, vocab_size: int):
    """A byte-level BPE (:func:`train_bpe_tokenizer`) trained on the data set's train prompts and responses,
    cached under ``<cache_dir>/tokenizers/data-<hash of the texts and vocab_size>`` (locked, renamed into place)."""
    import hashlib

    from transformers import PreTrainedTokenizerFast

    from rlkd_cli.data import dataset

    texts = [ex["prompt"] + ex["response"] for ex in dataset.load_examples(dataset_cfg, "train")]
    h = hashlib.sha256(str(vocab_size).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
    path = cache_dir / "tokenizers" / f"data-{h.hexdigest()[:16]}"
    if not _is_complete(path):
        with file_lock(path.parent / f".{path.name}.lock"):
            if not _is_complete(path):
                log.info("training a tokenizer (vocab %d) on the %d train examples of the data set into %s",
                         vocab_size, len(texts), path)
                tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
                with atomic_dir(path) as tmp:
                    tok.save_pretrained(str(tmp))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (what sharing logits across models needs)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_model_tokenizer(path: str, tokenizer, *, role: str) -> None:
    """A model folder that carries its own tokenizer must carry the run's (same vocabulary), else one line.

    Tokenizing with one vocabulary and feeding a model trained with another trains or measures
    nonsense that still "completes"; folders without tokenizer files are not checked.
    """
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return
    own = load_tokenizer(str(folder), config_key=f"{role}.name_or_path")
    if not same_vocabulary(own, tokenizer):
        raise RlkdError(f"{role} '{path}' has a different tokenizer from the run's ({len(own)} vs {len(tokenizer)} "
                        f"tokens): its ids would mean other tokens; use models that share one tokenizer, or set "
                        f"tokenizer.name_or_path to the one they were trained with")


__all__ = ["EOS_TOKEN", "PAD_TOKEN", "TOKENIZER_FILES", "check_model_tokenizer", "data_tokenizer", "embedded_tokenizer",
           "embedded_tokenizer_dir", "fingerprint", "for_run", "load_tokenizer", "same_vocabulary",
           "train_bpe_tokenizer"]
