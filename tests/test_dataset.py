"""The dataset module: sources (generator, files, folders, hub), carving, templates, masking of the
prompt, truncation, packing, collation and the user-facing errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlkd_cli.data import dataset as D
from rlkd_cli.data import synthetic
from rlkd_cli.errors import RlkdError
from rlkd_cli.data.tokenizer import embedded_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "dataset"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")

COMMON_KEYS = {"name", "kind", "path", "hub_id", "hub_config", "splits", "validation_size", "fields",
               "prompt_template", "response_template", "max_length", "skip_malformed", "metric", "id_field", "limit"}


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return embedded_tokenizer(tmp_path_factory.mktemp("cache"), vocab_size=512, num_rows=1500)


def cfg(name: str, **overrides) -> dict:
    d = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    d.update(overrides)
    return d


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("name", ["synthetic_math", "gsm8k", "dolly", "xsum", "text", "jsonl"])
def test_configs_are_explicit_and_valid(name):
    text = (CONF / f"{name}.yaml").read_text()
    assert text.startswith("#") and "override" in text.split("name:")[0].lower()
    d = yaml.safe_load(text)
    assert COMMON_KEYS <= set(d), COMMON_KEYS - set(d)
    assert d["name"] == name
    full = D.dataset_cfg(d)
    expected_metric = {"synthetic_math": "accuracy", "gsm8k": "accuracy", "dolly": "rougeL", "xsum": "rougeL",
                       "text": "perplexity", "jsonl": "perplexity"}[name]
    assert D.metric_name(d) == full["metric"] == expected_metric


def test_config_accepts_omegaconf_and_whole_run_config():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"dataset": cfg("synthetic_math", num_train=5, num_validation=2, num_test=2)})
    assert len(D.load_rows(node, "train")) == 5
    with pytest.raises(RlkdError, match="dataset.kind"):
        D.dataset_cfg(cfg("jsonl", kind="images"))
    with pytest.raises(RlkdError, match="max_length"):
        D.dataset_cfg(cfg("jsonl", max_length=1))


def test_synthetic_and_gsm8k_share_the_template():
    s, g = cfg("synthetic_math"), cfg("gsm8k")
    assert (s["prompt_template"], s["response_template"]) == (g["prompt_template"], g["response_template"])
    assert s["prompt_template"] == "Question: {question}\nAnswer:" and s["response_template"] == " {answer}"


# ------------------------------------------------------------------------------------------ sources

def test_synthetic_rows_come_from_the_generator():
    c = cfg("synthetic_math", num_train=40, num_validation=10, num_test=10, seed=3)
    splits = synthetic.generate_splits(40, 10, 10, seed=3)
    for split in D.SPLITS:
        assert D.load_rows(c, split) == splits[split]
    ex = D.load_examples(c, "test")
    assert ex[0] == {"id": "0", "prompt": f"Question: {splits['test'][0]['question']}\nAnswer:",
                     "response": " " + splits["test"][0]["answer"], "reference": splits["test"][0]["answer"]}
    assert len(D.load_examples(c, "train", limit=7)) == 7
    assert len(D.load_rows({**c, "limit": 4}, "train")) == 4


@needs_shared
@pytest.mark.parametrize("name,rel,count", [
    ("gsm8k", "gsm8k/test.jsonl", 1319),
    ("dolly", "dolly/test.jsonl", 800),
    ("xsum", "xsum/test_sample.jsonl", 300),
    ("text", "pretrain/slimpajama_sample.jsonl", 500),
])
def test_every_row_of_the_real_files(name, rel, count):
    path = SHARED / rel
    c = cfg(name, path=str(path))
    rows = D.load_rows(c, "test")
    assert rows == read_jsonl(path)
    assert len(rows) == count
    ex = D.load_examples(c, "test")
    assert len(ex) == count
    assert all(e["reference"] and e["response"].strip() == e["reference"] for e in ex)
    if name == "xsum":
        assert [e["id"] for e in ex] == [str(r["id"]) for r in rows]
        assert all(e["prompt"].startswith("Summarize the following article in one sentence.\n\n") for e in ex)
    else:
        assert [e["id"] for e in ex] == [str(i) for i in range(count)]
    if name == "text":
        assert all(e["prompt"] == "" and e["response"] == r["text"] for e, r in zip(ex, rows))


@needs_shared
def test_dolly_templates_with_and_without_context():
    c = cfg("dolly", path=str(SHARED / "dolly" / "test.jsonl"))
    rows = D.load_rows(c, "test")
    ex = D.load_examples(c, "test")
    with_ctx = without = 0
    for row, e in zip(rows, ex):
        if row["context"].strip():
            with_ctx += 1
            expected = c["prompt_template"].format(instruction=row["instruction"], context=row["context"])
            assert "### Input:\n" + row["context"] in e["prompt"]
        else:
            without += 1
            expected = c["prompt_template_no_input"].format(instruction=row["instruction"])
            assert "### Input:" not in e["prompt"]
        assert e["prompt"] == expected
        assert e["response"] == row["response"]
    assert with_ctx > 50 and without > 50


@needs_shared
def test_gsm8k_folder_carves_validation_from_the_end_of_train():
    c = cfg("gsm8k", path=str(SHARED / "gsm8k"))
    full_train = read_jsonl(SHARED / "gsm8k" / "train.jsonl")
    train, val = D.load_rows(c, "train"), D.load_rows(c, "validation")
    assert len(full_train) == 7473
    assert train == full_train[:-200] and val == full_train[-200:]
    assert len(D.load_rows(c, "test")) == 1319


def test_single_file_serves_every_split(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    c = cfg("jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)), validation_size=3)
    assert D.load_rows(c, "train") == rows[:7]
    assert D.load_rows(c, "validation") == rows[7:]
    assert D.load_rows(c, "test") == rows
    with pytest.raises(RlkdError, match="too few"):
        D.load_rows({**c, "validation_size": 10}, "train")
    # A .json file holding a list of objects works the same.
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert D.load_rows({**c, "path": str(tmp_path / "d.json")}, "train") == rows[:7]


def test_folder_split_files_and_carving(tmp_path):
    train = [{"prompt": f"t{i}", "response": "x"} for i in range(12)]
    test = [{"prompt": f"s{i}", "response": "y"} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test_sample.jsonl", test)  # a file whose name contains the split name
    c = cfg("jsonl", path=str(tmp_path), validation_size=4)
    assert D.load_rows(c, "train") == train[:8]
    assert D.load_rows(c, "validation") == train[8:]
    assert D.load_rows(c, "test") == test
    # test_size carves a test split too when the source has none (as for Dolly on the hub).
    (tmp_path / "test_sample.jsonl").unlink()
    c2 = {**c, "test_size": 2}
    assert D.load_rows(c2, "test") == train[10:]
    assert D.load_rows(c2, "validation") == train[6:10]
    assert D.load_rows(c2, "train") == train[:6]
    with pytest.raises(RlkdError, match="has no test split"):
        D.load_rows(c, "test")
    # An explicit validation file is used as is and train stays whole.
    val = [{"prompt": "v", "response": "z"}]
    write_jsonl(tmp_path / "valid.jsonl", val)
    assert D.load_rows(c, "validation") == val and D.load_rows(c, "train") == train


def test_folder_without_train(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "a", "response": "b"}])
    c = cfg("jsonl", path=str(tmp_path))
    assert len(D.load_rows(c, "test")) == 1
    with pytest.raises(RlkdError, match=r"has no train split in .*test\.jsonl"):
        D.load_rows(c, "train")


# ------------------------------------------------------------------------------------------ errors

def test_missing_column_names_it_the_columns_and_the_key(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": "1", "b": "2"}])
    with pytest.raises(RlkdError) as e:
        D.load_examples(cfg("dolly", path=str(path)), "test")
    assert str(e.value) == (f"dolly: columns 'instruction', 'context', 'response' not found in {path} (columns: a, b); "
                            f"set dataset.fields.instruction=<column> dataset.fields.context=<column> "
                            f"dataset.fields.response=<column>")
    # Mapping the columns through `fields` fixes it.
    c = cfg("jsonl", path=str(path), fields={"prompt": "a", "response": "b"})
    assert D.load_examples(c, "test")[0] == {"id": "0", "prompt": "1", "response": " 2", "reference": "2"}


@pytest.mark.parametrize("literal, shown", [("NaN", "NaN (a number)"), ("Infinity", "Infinity (a number)"),
                                            ("-Infinity", "-Infinity (a number)"), ("12.5", "12.5 (a number)"),
                                            ("true", "true (a boolean)")])
def test_a_non_string_in_a_text_column_is_refused_with_its_line(tmp_path, literal, shown):
    """JSON Lines' NaN / Infinity literals (Python's json reads them as floats) and other non-strings never become
    training text ("nan"): one line naming file:line, the column and the fix."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "one"}, "",
                                              f'{{"prompt": "b", "response": {literal}}}'])
    with pytest.raises(RlkdError) as e:
        D.load_examples(cfg("jsonl", path=str(path), validation_size=0), "test")
    assert str(e.value) == (f"dataset 'jsonl': {path}:3 holds {shown} in column 'response', where rlkd reads text; "
                            "write it as a JSON string (\"...\"), or map another column with "
                            "dataset.fields.response=<column>")
    # a carved split names the row's own line, not its index in the split
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(6)] + [{"prompt": float("nan"), "response": "x"}]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    with pytest.raises(RlkdError, match=r"v\.jsonl:7 holds NaN \(a number\) in column 'prompt'"):
        D.load_examples(cfg("jsonl", path=str(path), validation_size=2), "validation")


def test_every_missing_column_is_named_in_one_line_before_any_row_count(tmp_path):
    """Both missing columns at once, and before the 3-row file is found too short for validation_size=100."""
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(RlkdError) as e:
        D.load_examples(cfg("jsonl", path=str(path)), "train")
    assert str(e.value) == (f"jsonl: columns 'prompt', 'response' not found in {path} (columns: question, answer); "
                            "set dataset.fields.prompt=<column> dataset.fields.response=<column>")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(RlkdError, match=r"columns 'prompt', 'response' not found in .*train\.jsonl"):
        D.check(cfg("jsonl", path=str(folder)))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(RlkdError, match=r"empty.jsonl is empty \(no rows\)"):
        D.load_rows(cfg("jsonl", path=str(path)), "test")


def test_malformed_line_and_skip_malformed(tmp_path, caplog, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "oops"',
                                                {"prompt": "c", "response": "d"}, "[1, 2]"])
    with pytest.raises(RlkdError, match=r"bad\.jsonl:2: malformed JSON line .*skip_malformed=true"):
        D.load_rows(cfg("jsonl", path=str(path)), "test")
    c = cfg("jsonl", path=str(path), skip_malformed=True, validation_size=0)
    with caplog.at_level(logging.WARNING, logger="rlkd.data"):
        rows = D.load_rows(c, "test")
    assert rows == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    assert "skipped 2 malformed line(s)" in caplog.text
    assert D.build_split(c, tok, "test").stats["num_malformed"] == 2


def test_jsonl_without_path():
    with pytest.raises(RlkdError, match=r"^dataset=jsonl needs dataset\.path=FILE\.jsonl"):
        D.load_rows(cfg("jsonl"), "train")
    with pytest.raises(RlkdError, match=r"^dataset=text needs dataset\.path=FILE\.jsonl"):
        D.load_rows(cfg("text"), "train")


def test_missing_local_path_and_bad_split(tmp_path):
    with pytest.raises(RlkdError, match="no such file or folder"):
        D.load_rows(cfg("jsonl", path=str(tmp_path / "nope.jsonl")), "train")
    with pytest.raises(RlkdError, match="unknown split"):
        D.load_rows(cfg("synthetic_math"), "dev")


def test_empty_split_after_building(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 3)
    with pytest.raises(RlkdError, match=r"dataset 'jsonl' split 'train' has no examples: .* check dataset\.path"):
        D.build_split(cfg("jsonl", path=str(path), limit=0, validation_size=0), tok, "train")
    with pytest.raises(RlkdError, match="fewer than one block"):
        D.build_split(cfg("text", path=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}])), validation_size=0),
                      tok, "train")


def test_unreachable_hub_id_offline(tmp_path):
    code = (
        "import yaml\n"
        "from rlkd_cli.data import dataset as D\n"
        "from rlkd_cli.errors import RlkdError\n"
        f"c = yaml.safe_load(open({str(CONF / 'gsm8k.yaml')!r}))\n"
        "for c2 in (c, {**c, 'path': 'rlkd-test-org/no-such-dataset'}):\n"
        "    try:\n"
        "        D.load_rows(c2, 'train')\n"
        "    except RlkdError as e:\n"
        "        print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 2
    for line, hub_id in zip(lines, ["openai/gsm8k", "rlkd-test-org/no-such-dataset"]):
        assert line.startswith(f"ERR cannot load dataset '{hub_id}' from the hub (offline or unreachable, "
                               "not cached); point dataset.path at a local file or folder")
        assert "\n" not in line


# ------------------------------------------------------------------------------------------ tokenization

def _check_masking(split, examples, tok, max_length):
    """Brute force: the labelled tokens decode to response + eos; the rest decodes to the prompt."""
    eos = tok.eos_token_id
    for row, ex in zip(split.dataset, examples):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) <= max_length
        n_prompt = sum(1 for t in labels if t == -100)
        assert all(t == -100 for t in labels[:n_prompt])  # masked tokens form a prefix
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == eos
        assert tok.decode(ids[n_prompt:]) == ex["response"] + tok.eos_token
        assert tok.decode(ids[:n_prompt]) == ex["prompt"]


def test_labels_mask_exactly_the_prompt(tok):
    c = cfg("synthetic_math", num_train=30, num_validation=5, num_test=5)
    split = D.build_split(c, tok, "train")
    examples = D.load_examples(c, "train")
    assert split.stats["num_examples"] == 30 and split.stats["num_truncated"] == 0
    assert set(split.dataset.column_names) == {"input_ids", "labels", "prompt_ids"}  # (prompt_ids: for rollouts)
    _check_masking(split, examples, tok, c["max_length"])
    assert split.stats["num_tokens"] == sum(len(r) for r in split.dataset["input_ids"])
    assert split.stats["num_response_tokens"] == sum(
        len(tok(e["response"])["input_ids"]) + 1 for e in examples)


@needs_shared
def test_labels_on_real_gsm8k(tok):
    c = cfg("gsm8k", path=str(SHARED / "gsm8k" / "test.jsonl"), max_length=4096)
    split = D.build_split(c, tok, "test", limit=40)
    _check_masking(split, D.load_examples(c, "test", limit=40), tok, 4096)


def test_truncation_cuts_the_prompt_from_the_left_then_the_response(tmp_path, tok):
    rows = [
        {"prompt": "short", "response": "fits easily"},
        {"prompt": " ".join(f"word{i}" for i in range(60)), "response": "the answer"},  # prompt is cut
        {"prompt": "q", "response": " ".join(f"tok{i}" for i in range(80))},  # response is cut
    ]
    max_length = 40
    c = cfg("jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=max_length, validation_size=0)
    split = D.build_split(c, tok, "test")
    examples = D.load_examples(c, "test")
    eos = tok.eos_token_id
    # Brute-force expectation.
    expected_trunc = 0
    for row, ex in zip(split.dataset, examples):
        p = tok(ex["prompt"])["input_ids"]
        r = tok(ex["response"])["input_ids"]
        ids, labels = row["input_ids"], row["labels"]
        if len(p) + len(r) + 1 <= max_length:
            assert ids == p + r + [eos]
        elif len(r) + 2 <= max_length:
            expected_trunc += 1
            keep = max_length - len(r) - 1
            assert ids == p[-keep:] + r + [eos] and len(ids) == max_length
            assert labels == [-100] * keep + r + [eos]
        else:
            expected_trunc += 1
            assert ids == p[-1:] + r[: max_length - 1] and eos not in ids
            assert labels == [-100] + r[: max_length - 1]
    assert expected_trunc == 2
    assert split.stats["num_truncated"] == 2 and split.stats["num_dropped"] == 0
    assert split.stats["num_examples"] == 3


def test_a_response_generation_cut_off_is_trained_without_an_eos(tmp_path, tok):
    """rlkd generate marks a response that hit max_new_tokens with ended_with_eos: false; dataset=jsonl must not
    teach the model to stop there (rows that ended at eos, or without the column, keep their eos)."""
    rows = [{"prompt": "Q: a", "response": "cut here", "ended_with_eos": False},
            {"prompt": "Q: b", "response": "ended", "ended_with_eos": True},
            {"prompt": "Q: c", "response": "plain data"}]
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    split = D.build_split(cfg("jsonl", path=str(path), validation_size=0), tok, "test")
    eos = tok.eos_token_id
    labels = [[t for t in row["labels"] if t != -100] for row in split.dataset]
    assert labels[0] == tok(" cut here", add_special_tokens=False)["input_ids"]
    assert labels[1] == tok(" ended", add_special_tokens=False)["input_ids"] + [eos]
    assert labels[2][-1] == eos
    # the flag is part of the fingerprint: the same texts with an eos are another tokenized split
    rows[0]["ended_with_eos"] = True
    again = D.build_split(cfg("jsonl", path=str(write_jsonl(tmp_path / "gen.jsonl", rows)), validation_size=0), tok,
                          "test")
    assert again.fingerprint != split.fingerprint and again.dataset[0]["labels"][-1] == eos


def test_tokenize_example_edge_cases():
    bos, eos = 1, 2
    # Fits: [bos] + prompt + response + eos.
    assert D.tokenize_example([bos], [10, 11], [20], eos, 10) == ([1, 10, 11, 20, 2], [-100, -100, -100, 20, 2], False)
    # Prompt cut from the left but BOS kept.
    assert D.tokenize_example([bos], [10, 11, 12, 13], [20, 21], eos, 6) == (
        [1, 12, 13, 20, 21, 2], [-100, -100, -100, 20, 21, 2], True)
    # Response cut: BOS + last prompt token + as much response as fits, no eos.
    assert D.tokenize_example([bos], [10, 11], [20, 21, 22, 23], eos, 4) == (
        [1, 11, 20, 21], [-100, -100, 20, 21], True)
    # Nothing of the response fits: dropped.
    assert D.tokenize_example([bos], [10, 11], [20, 21], eos, 2) is None
    # Empty prompt: the response alone.
    assert D.tokenize_example([], [], [20, 21, 22], eos, 3) == ([20, 21, 22], [20, 21, 22], True)


def test_text_packing(tmp_path, tok):
    docs = [{"text": f"Document number {i} says hello world {'and more ' * i}."} for i in range(30)]
    L = 16
    c = cfg("text", path=str(write_jsonl(tmp_path / "t.jsonl", docs)), max_length=L, validation_size=5)
    split = D.build_split(c, tok, "train")
    stream = []
    for d in docs[:25]:
        stream += tok(d["text"])["input_ids"] + [tok.eos_token_id]
    n_blocks = len(stream) // L
    assert split.stats["num_examples"] == n_blocks == len(split.dataset)
    assert split.stats["num_dropped_tokens"] == len(stream) - n_blocks * L > 0
    assert split.stats["num_documents"] == 25
    blocks = split.dataset["input_ids"]
    assert all(len(b) == L for b in blocks)
    assert [t for b in blocks for t in b] == stream[: n_blocks * L]
    assert split.dataset["labels"] == blocks
    assert split.stats["num_response_tokens"] == split.stats["num_tokens"] == n_blocks * L
    ex = D.load_examples(c, "validation")
    assert [e["response"] for e in ex] == [d["text"] for d in docs[25:]] and all(e["prompt"] == "" for e in ex)


@needs_shared
def test_xsum_prompt_left_truncation(tok):
    c = cfg("xsum", path=str(SHARED / "xsum" / "test_sample.jsonl"), max_length=256)
    split = D.build_split(c, tok, "test", limit=30)
    examples = D.load_examples(c, "test", limit=30)
    n_trunc = 0
    for row, ex in zip(split.dataset, examples):
        r = tok(ex["response"])["input_ids"]
        p = tok(ex["prompt"])["input_ids"]
        if len(p) + len(r) + 1 > 256:
            n_trunc += 1
            # The whole summary is kept; the prompt's end ("Summary:") survives.
            assert row["input_ids"][-len(r) - 1:] == r + [tok.eos_token_id]
            assert tok.decode(row["input_ids"][: 256 - len(r) - 1]).endswith("\n\nSummary:")
    assert n_trunc == split.stats["num_truncated"] > 0


# ------------------------------------------------------------------------------------------ collate

def test_collate_right_padding():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]},
             {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2])}]
    out = D.collate(feats, pad_token_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == (3, 3) for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [1, 2, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 2, -100]]
    # Without labels, labels are the input ids (text).
    assert D.collate([{"input_ids": [3, 4]}, {"input_ids": [9]}], 0)["labels"].tolist() == [[3, 4], [9, -100]]


def test_collate_a_built_split(tok):
    c = cfg("synthetic_math", num_train=8, num_validation=2, num_test=2)
    split = D.build_split(c, tok, "train")
    feats = [split.dataset[i] for i in range(len(split.dataset))]
    out = D.collate(feats, tok.pad_token_id)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert out["input_ids"][i, :n].tolist() == f["input_ids"]
        assert (out["input_ids"][i, n:] == tok.pad_token_id).all()
        assert out["attention_mask"][i].sum().item() == n
        assert out["labels"][i, :n].tolist() == f["labels"] and (out["labels"][i, n:] == -100).all()
