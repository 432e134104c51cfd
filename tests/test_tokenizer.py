"""The locally trained byte-level BPE: lossless round trips, single-digit tokens, caching (trained
once, also under concurrency), loading in a Python that never imports rlkd_cli, and load_tokenizer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rlkd_cli.data import synthetic
from rlkd_cli.data import tokenizer as T
from rlkd_cli.errors import RlkdError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

SAMPLES = [
    "Tom has 12 apples. He buys 3 * 4 = <<3*4=12>>12 more.\n#### 24",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "emoji 😀🎉 and Chinese 你好，世界 and accents café naïve Ünïcödé",
    "symbols ~!@#$%^&*()_+`-=[]{}|;':\",./<>?\\ and a zero-width\u200bjoiner",
    "<|endoftext|> inside text is a special token",
    "",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rlkd-cache")


@pytest.fixture(scope="session")
def tok(cache_dir):
    return T.embedded_tokenizer(cache_dir)  # the real default: 20000 synthetic rows, vocab 1024


def test_properties(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.padding_side == "right"
    assert tok.model_max_length >= 100_000
    assert len(tok) <= 1024
    vocab = tok.get_vocab()
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(vocab)  # the whole byte alphabet: any text encodes
    ids = tok("Tom has 3 apples.")["input_ids"]
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids  # no automatic BOS/EOS
    assert tok("Tom has 3 apples.", add_special_tokens=True)["input_ids"] == ids


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_round_trip_all_bytes_of_unicode(tok):
    text = "".join(chr(c) for c in range(1, 0x2FF)) + "".join(chr(c) for c in range(0x4E00, 0x4E40))
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_round_trip_real_data(tok):
    texts = []
    for line in (SHARED / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["question"], row["answer"]]
    for line in (SHARED / "dolly" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["instruction"], row["context"], row["response"]]
    assert len(texts) == 2 * 1319 + 3 * 800
    enc = tok(texts)["input_ids"]
    decoded = tok.batch_decode(enc)
    bad = [t for t, d in zip(texts, decoded) if t != d]
    assert not bad, bad[:2]


def test_digits_are_single_tokens(tok):
    for d in "0123456789":
        assert len(tok(d)["input_ids"]) == 1
    ids = tok("x 1234567890 y")["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    digit_pieces = [p for p in pieces if re.search(r"\d", p)]
    assert digit_pieces == list("1234567890")
    # No vocabulary entry mixes a digit with anything else.
    for token in tok.get_vocab():
        text = tok.convert_tokens_to_string([token])
        if re.search(r"\d", text):
            assert len(text) == 1 and text.isdigit(), token


def test_synthetic_examples_are_short_and_words_single_tokens(tok):
    rows = synthetic.generate_splits(0, 0, 2000, seed=99)["test"]
    lengths = [len(tok(f"Question: {r['question']}\nAnswer:")["input_ids"])
               + len(tok(" " + r["answer"])["input_ids"]) + 1 for r in rows]
    assert max(lengths) <= 110, max(lengths)
    words = set()
    for r in rows:
        words.update(re.findall(r"[A-Za-z]+", r["question"] + " " + r["answer"]))
    single = [w for w in words if len(tok(" " + w)["input_ids"]) == 1]
    assert len(single) >= 0.9 * len(words)


def test_cache_is_reused(tok, cache_dir):
    path = T.embedded_tokenizer_dir(cache_dir)
    assert path == Path(cache_dir) / "tokenizers" / f"synthetic-v{synthetic.GENERATOR_VERSION}-1024"
    assert (path / "tokenizer.json").is_file()
    mtime = (path / "tokenizer.json").stat().st_mtime_ns
    count = T.TRAIN_COUNT
    again = T.embedded_tokenizer(cache_dir)
    assert T.TRAIN_COUNT == count
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
    assert again.get_vocab() == tok.get_vocab()
    # No temporary folders left behind.
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".synthetic")) == [path.name]


def test_concurrent_callers_train_once(tmp_path):
    count = T.TRAIN_COUNT
    results, errors = [], []

    def worker():
        try:
            results.append(T.embedded_tokenizer(tmp_path, vocab_size=400, num_rows=300))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert T.TRAIN_COUNT == count + 1
    assert len({json.dumps(r.get_vocab(), sort_keys=True) for r in results}) == 1


def test_train_is_deterministic_and_respects_vocab_size():
    texts = [r["question"] + "\n" + r["answer"] for r in synthetic.generate(300, seed=2)]
    a = T.train_bpe_tokenizer(texts, vocab_size=300)
    b = T.train_bpe_tokenizer(texts, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == 300
    with pytest.raises(RlkdError, match="too small"):
        T.train_bpe_tokenizer(texts, vocab_size=100)


def test_loads_in_clean_python_without_rlkd(tok, cache_dir):
    path = T.embedded_tokenizer_dir(cache_dir)
    text = "Tom has 12 apples 😀.\n#### 12"
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(path)!r})\n"
        f"ids = t({text!r})['input_ids']\n"
        "assert not any(m.startswith('rlkd_cli') for m in sys.modules)\n"
        "print(json.dumps({'ids': ids, 'eos': t.eos_token, 'pad': t.pad_token, 'side': t.padding_side,"
        " 'dec': t.decode(ids)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(cache_dir), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ids"] == tok(text)["input_ids"]
    assert (got["eos"], got["pad"], got["side"], got["dec"]) == ("<|endoftext|>", "<|pad|>", "right", text)


def test_load_tokenizer_local_folder_and_pad_fallback(tok, cache_dir, tmp_path):
    loaded = T.load_tokenizer(T.embedded_tokenizer_dir(cache_dir))
    assert loaded.get_vocab() == tok.get_vocab() and loaded.pad_token == "<|pad|>"
    # A tokenizer saved without a pad token gets pad = eos.
    from transformers import PreTrainedTokenizerFast

    nopad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    nopad.save_pretrained(str(tmp_path / "nopad"))
    got = T.load_tokenizer(tmp_path / "nopad")
    assert got.pad_token == got.eos_token == "<|endoftext|>"


def test_load_tokenizer_missing_local_folder(tmp_path):
    with pytest.raises(RlkdError, match=r"cannot load tokenizer '.*nope': no such local folder; set student"):
        T.load_tokenizer(str(tmp_path / "nope"))
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(RlkdError, match="not a folder"):
        T.load_tokenizer(f)


def test_load_tokenizer_unreachable_hub_id_offline(tmp_path):
    code = (
        "from rlkd_cli.data.tokenizer import load_tokenizer\n"
        "from rlkd_cli.errors import RlkdError\n"
        "try:\n"
        "    load_tokenizer('rlkd-test-org/no-such-tokenizer', config_key='teacher.name_or_path')\n"
        "except RlkdError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line == ("ERR cannot load tokenizer 'rlkd-test-org/no-such-tokenizer': no such local folder and not in "
                    "the hub cache (offline); set teacher.name_or_path to a local folder")


def test_models_built_from_scratch_on_real_data_get_a_tokenizer_trained_on_its_text(tmp_path):
    """The tiny teacher allowed on real data (and any arch model there) reads it through merges made for it,
    not through the synthetic task's: a word frequent in the data is one token; the tokenizer is cached."""
    from conftest import QUICK, compose

    rows = [{"prompt": f"Quadrilateral {i} perimeter?", "response": f"The perimeter of quadrilateral {i}"}
            for i in range(300)]
    path = tmp_path / "real.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("distill", QUICK + ["dataset=jsonl", f"dataset.path={path}", f"cache_dir={tmp_path / 'cache'}"])
    before = T.TRAIN_COUNT
    tok = T.for_run(cfg, [("teacher", cfg.teacher)])
    assert len(tok(" quadrilateral", add_special_tokens=False)["input_ids"]) == 1
    embedded = T.for_run(compose("distill", QUICK + [f"cache_dir={tmp_path / 'cache'}"]), [])
    assert len(embedded(" quadrilateral", add_special_tokens=False)["input_ids"]) > 1
    assert T.fingerprint(T.for_run(cfg, [])) == T.fingerprint(tok) and T.TRAIN_COUNT == before + 2  # cached
    assert tok.decode(tok("naïve 🙂 text", add_special_tokens=False)["input_ids"]) == "naïve 🙂 text"
