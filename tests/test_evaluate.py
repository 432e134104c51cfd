"""`rlkd evaluate`: scoring functions, predictions files on real data, batched generation, end to end."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from conftest import compose, run_cli
from rlkd_cli import generation, scoring
from rlkd_cli.commands import evaluate as evaluate_cmd

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
SMALL_SYNTH = ["dataset.num_train=600", "dataset.num_validation=32", "dataset.num_test=32"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _gold_number(answer: str) -> Decimal:
    """GSM8K's own convention, independent of the evaluator: the text after the last '####'."""
    return Decimal(answer.rsplit("####", 1)[1].strip().replace(",", ""))


def _score_file(tmp_path: Path, overrides: list[str], predictions: Path) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    cfg = compose("evaluate", [*overrides, f"predictions={predictions}", "trainer.progress=false"])
    result = evaluate_cmd.run(cfg, out)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result))
    return result, _read_jsonl(out / "predictions.jsonl")


# ----------------------------------------------------------------------------------------------
# Pure scoring
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Janet sells 9 eggs.\n#### 1,234", "1234"),
    ("#### $5", "5"),
    ("She pays $5 each, so $1,250.50 in total.", "1250.50"),
    ("3 + 4 = <<3+4=7>>7 apples, then 7 * 2 = 14 pears", "14"),
    ("16-3 = 13", "13"),
    ("it dropped to -5 degrees", "-5"),
    ("#### 18.0\n\nQuestion: 42 more", "18.0"),
    ("the answer is 12.", "12"),
    ("no digits here", None),
    ("#### none", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert scoring.extract_final_number(text) == expected


def test_accuracy_score_is_numeric():
    assert scoring.accuracy_score("so 18.0", "blah\n#### 18")
    assert scoring.accuracy_score("#### $1,000", "#### 1000")
    assert not scoring.accuracy_score("#### 19", "#### 18")
    assert not scoring.accuracy_score("no number", "#### 18")
    assert not scoring.accuracy_score("#### 18", "no number")


def test_rouge_l_matches_rouge_score_and_hand_count():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "running dogs", "", "A B C D"]
    refs = ["the cat is on the mat", "the dog runs", "something", "d c b a"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [100 * scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    assert scoring.rouge_l(preds, refs) == pytest.approx(expected, abs=1e-12)
    # by hand: LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each -> F1 = 5/6
    assert scoring.rouge_l(preds, refs)[0] == pytest.approx(100 * 5 / 6)
    # stemming: run/runs, dog/dogs -> LCS("run dog", "the dog run") = 1: P = 1/2, R = 1/3, F1 = 0.4
    assert scoring.rouge_l(preds, refs)[1] == pytest.approx(40.0)
    assert scoring.rouge_l(preds, refs)[2] == 0.0


def test_read_predictions_fixture_groups_by_model():
    groups = scoring.read_predictions(FIXTURES / "two_models.jsonl", default_label="file")
    assert groups == {"file": {"0": "#### 3", "1": "#### 7"}, "other": {"0": "#### 4"}}


# ----------------------------------------------------------------------------------------------
# Predictions files on the real data sets
# ----------------------------------------------------------------------------------------------

def test_gsm8k_gold_and_altered_answers(shared_data, tmp_path):
    path = shared_data / "gsm8k" / "test.jsonl"
    rows = _read_jsonl(path)
    assert len(rows) == 1319
    overrides = ["dataset=gsm8k", f"dataset.path={path}"]
    gold = _write_jsonl(tmp_path / "gold.jsonl", [{"id": str(i), "prediction": r["answer"]} for i, r in enumerate(rows)])
    result, lines = _score_file(tmp_path / "a", overrides, gold)
    (row,) = result["models"]
    assert result["metric"] == "accuracy" and result["dataset"] == "gsm8k" and result["split"] == "test"
    assert row["accuracy"] == 1.0 and row["examples"] == 1319 and row["scored"] == 1319
    assert len(lines) == 1319 and all(line["correct"] is True for line in lines)

    # every 4th answer off by one (wrong); the others right but written differently
    altered, wrong = [], 0
    for i, r in enumerate(rows):
        n = _gold_number(r["answer"])
        if i % 4 == 0:
            text, wrong = f"I think it is {n + 1}.", wrong + 1
        elif i % 4 == 1:
            text = f"#### ${int(n):,}" if n == int(n) else f"#### {n}"
        elif i % 4 == 2:
            text = f"So the answer is {n}.0 in the end"
        else:
            text = r["answer"]
        altered.append({"id": i, "prediction": text})   # integer ids are accepted too
    result, lines = _score_file(tmp_path / "b", overrides, _write_jsonl(tmp_path / "alt.jsonl", altered))
    assert wrong == 330
    assert result["models"][0]["accuracy"] == (1319 - wrong) / 1319
    assert [line["correct"] for line in lines] == [i % 4 != 0 for i in range(1319)]


@pytest.mark.parametrize("name, file, field", [("dolly", "dolly/test.jsonl", "response"),
                                                ("xsum", "xsum/test_sample.jsonl", "summary")])
def test_rouge_gold_is_100_and_shifted_matches_rouge_score(shared_data, tmp_path, name, file, field):
    from rouge_score import rouge_scorer

    path = shared_data / file
    rows = _read_jsonl(path)
    ids = [str(r["id"]) if name == "xsum" else str(i) for i, r in enumerate(rows)]
    overrides = [f"dataset={name}", f"dataset.path={path}"]
    gold = _write_jsonl(tmp_path / "gold.jsonl", [{"id": i, "prediction": r[field]} for i, r in zip(ids, rows)])
    result, _ = _score_file(tmp_path / "a", overrides, gold)
    (row,) = result["models"]
    assert row["rougeL"] == pytest.approx(100.0, abs=1e-9) and row["scored"] == len(rows) == row["examples"]

    # each prediction is the next row's reference: the score equals rouge-score's own mean F1 x 100
    shifted = [rows[(i + 1) % len(rows)][field] for i in range(len(rows))]
    preds = _write_jsonl(tmp_path / "shifted.jsonl", [{"id": i, "prediction": p} for i, p in zip(ids, shifted)])
    result, lines = _score_file(tmp_path / "b", overrides, preds)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per = [100 * scorer.score(r[field].strip(), p)["rougeL"].fmeasure for r, p in zip(rows, shifted)]
    assert result["models"][0]["rougeL"] == pytest.approx(sum(per) / len(per), rel=1e-12)
    assert [line["rougeL"] for line in lines] == pytest.approx(per, rel=1e-12)
    assert 0 < result["models"][0]["rougeL"] < 50


def test_rescoring_own_predictions_and_limit(tmp_path):
    """predictions.jsonl written by evaluate (with its model key) scores again to the same numbers."""
    first, lines = _score_file(tmp_path / "a", SMALL_SYNTH + ["eval.limit=10"], FIXTURES / "two_models.jsonl")
    assert [r["model"] for r in first["models"]] == [str(FIXTURES / "two_models.jsonl"), "other"]
    assert first["models"][0]["predicted"] == 2 and first["models"][0]["missing"] == 8
    assert first["models"][0]["examples"] == 10 and first["models"][0]["coverage"] == 0.2
    again, _ = _score_file(tmp_path / "b", SMALL_SYNTH + ["eval.limit=10"], tmp_path / "a" / "out" / "predictions.jsonl")
    assert [(r["model"], r["accuracy"]) for r in again["models"]] == [(r["model"], r["accuracy"]) for r in first["models"]]


def test_partial_predictions_are_scored_over_every_example_with_their_coverage(tmp_path):
    """4 right answers for 4 of the 32 test ids: accuracy 4/32 and coverage 4/32, never 1.0 over the 4."""
    from rlkd_cli.data import dataset as data_mod

    examples = data_mod.load_examples(compose("evaluate", SMALL_SYNTH).dataset, "test")
    assert len(examples) == 32
    preds = tmp_path / "four.jsonl"
    preds.write_text("".join(json.dumps({"id": ex["id"], "prediction": ex["reference"]}) + "\n" for ex in examples[:4]))
    result, lines = _score_file(tmp_path, SMALL_SYNTH, preds)
    row = result["models"][0]
    assert (row["accuracy"], row["coverage"], row["predicted"], row["missing"], row["examples"]) == (
        4 / 32, 4 / 32, 4, 28, 32)
    assert len(lines) == 4 and all(line["correct"] for line in lines)
    res = run_cli(["evaluate", *SMALL_SYNTH, f"predictions={preds}", f"hydra.run.dir={tmp_path}/cli"])
    assert res.exit_code == 0, res.output
    assert "4/32" in res.output and "0.1250" in res.output  # the table's coverage column and accuracy


# ----------------------------------------------------------------------------------------------
# Generation with a tiny random model
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a BPE trained on 300 synthetic rows, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlkd_cli.data.synthetic import generate as synth
    from rlkd_cli.data.tokenizer import train_bpe_tokenizer

    rows = synth(300, seed=7)
    tok = train_bpe_tokenizer([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows], vocab_size=400)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.3, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _greedy_by_hand(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """Unbatched greedy decoding without a KV cache: full forward pass, argmax, stop at eos."""
    seq = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        seq = seq + [nxt]
    return tokenizer.decode(out, skip_special_tokens=True).strip(), out


def _prompts(n: int) -> list[str]:
    from rlkd_cli.data.synthetic import generate as synth

    qs = [r["question"] for r in synth(n, seed=11)]
    # very different lengths so that batches are padded
    return [f"Question: {q}\nAnswer:" if i % 3 else f"Q: {q.split('.')[0]}\nA:" for i, q in enumerate(qs)]


def test_batched_generation_equals_unbatched_greedy_by_hand(tiny_model):
    model, tok = _load(tiny_model)
    prompts = _prompts(7)
    # make row 0 stop early: swap the output rows of eos and of the token greedy picks at step 3
    _, steps = _greedy_by_hand(model, tok, prompts[0], 8)
    target = steps[3]
    assert target != tok.eos_token_id
    with torch.no_grad():
        w = model.lm_head.weight
        w[[tok.eos_token_id, target]] = w[[target, tok.eos_token_id]].clone()
    expected = [_greedy_by_hand(model, tok, p, 12) for p in prompts]
    assert len(expected[0][1]) <= 3, "row 0 must hit eos within 4 steps"
    assert any(len(e[1]) == 12 for e in expected), "some row must run to max_new_tokens"
    batched = generation.generate(model, tok, prompts, batch_size=3, max_new_tokens=12)
    single = generation.generate(model, tok, prompts, batch_size=1, max_new_tokens=12)
    assert batched == single == [e[0] for e in expected]


def test_sampling_is_seeded(tiny_model):
    model, tok = _load(tiny_model)
    prompts = _prompts(4)
    kw = dict(batch_size=2, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    a = generation.generate(model, tok, prompts, seed=3, **kw)
    b = generation.generate(model, tok, prompts, seed=3, **kw)
    c = generation.generate(model, tok, prompts, seed=4, **kw)
    assert a == b and a != c


def test_evaluate_shows_progress_lines_off_a_terminal(tiny_model, tmp_path, caplog):
    """Off a terminal (a log, a pipe) evaluate says how far generation is, as distill does for its steps."""
    import logging

    cfg = compose("evaluate", [f"model.name_or_path={tiny_model}", *SMALL_SYNTH, "dataset.max_length=512",
                               "eval.limit=20", "eval.max_new_tokens=4", "eval.batch_size=5", "eval.perplexity=false"])
    with caplog.at_level(logging.INFO, logger="rlkd.engine"):
        evaluate_cmd.run(cfg, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.name == "rlkd.engine"]
    assert [line.split(" |")[0] for line in lines] == [f"[evaluate model] {n}/20" for n in (5, 10, 15, 20)], lines
    assert all("elapsed, ETA" in line for line in lines)


def test_evaluate_model_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "run"
    res = run_cli(["evaluate", f"model.name_or_path={tiny_model}", "dataset=synthetic_math", *SMALL_SYNTH,
                   "dataset.max_length=512", "eval.limit=8", "eval.max_new_tokens=16", "eval.batch_size=3",
                   "trainer.progress=false", f"hydra.run.dir={out}"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "ppl" in res.output
    result = json.loads((out / "results.json").read_text())
    (row,) = result["models"]
    assert (result["dataset"], result["split"], result["metric"]) == ("synthetic_math", "test", "accuracy")
    assert row["examples"] == 8 and row["scored"] == 8 and row["role"] == "model"
    lines = _read_jsonl(out / "predictions.jsonl")
    assert len(lines) == 8
    assert all({"id", "model", "prompt", "prediction", "reference", "correct"} <= set(line) for line in lines)
    assert row["accuracy"] == sum(line["correct"] for line in lines) / 8

    # the predictions are the model's greedy continuations; the perplexity is the references' by hand
    model, tok = _load(tiny_model)
    assert [line["prediction"] for line in lines[:3]] == [_greedy_by_hand(model, tok, line["prompt"], 16)[0]
                                                           for line in lines[:3]]
    from rlkd_cli.data import dataset as data_mod

    cfg = compose("evaluate", ["dataset=synthetic_math", *SMALL_SYNTH])
    examples = data_mod.load_examples(cfg.dataset, "test", limit=8)
    assert [e["reference"] for e in examples] == [line["reference"] for line in lines]
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            p = tok(e["prompt"], add_special_tokens=False)["input_ids"]
            r = tok(e["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].float(), -1)
            nll -= sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(r))
            count += len(r)
    assert row["perplexity_tokens"] == count
    assert row["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_checkpoints_side_by_side_with_teacher(tiny_model, tmp_path):
    """The teacher row (here a teacher given by path, so nothing is trained) beside a checkpoint: the
    same weights give the same predictions and scores in both rows."""
    out = tmp_path / "run"
    res = run_cli(["evaluate", *SMALL_SYNTH, f"teacher.name_or_path={tiny_model}", f"checkpoints=[{tiny_model}]",
                   "include_teacher=true", "eval.limit=4", "eval.max_new_tokens=8", "eval.perplexity=false",
                   "trainer.progress=false", f"hydra.run.dir={out}"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["role"]) for r in result["models"]] == [(str(tiny_model), "checkpoint"),
                                                                   ("teacher", "teacher")]
    assert all("perplexity" not in r and r["examples"] == 4 for r in result["models"])
    assert result["models"][0]["accuracy"] == result["models"][1]["accuracy"]
    lines = _read_jsonl(out / "predictions.jsonl")
    assert [line["model"] for line in lines] == [str(tiny_model)] * 4 + ["teacher"] * 4
    assert [line["prediction"] for line in lines[:4]] == [line["prediction"] for line in lines[4:]]
    assert re.search(r"^\W*teacher\W", res.output, re.M), res.output


def test_perplexity_dataset_by_hand(tiny_model, tmp_path):
    """metric: perplexity (the text kind): no generation; exp(mean NLL) of every token of the packed blocks."""
    out = tmp_path / "run"
    docs = FIXTURES / "docs.jsonl"
    res = run_cli(["evaluate", "dataset=text", f"dataset.path={docs}", "dataset.max_length=32",
                   f"model.name_or_path={tiny_model}", "eval.batch_size=3", "trainer.progress=false",
                   f"hydra.run.dir={out}"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    (row,) = result["models"]
    assert result["metric"] == "perplexity" and "accuracy" not in row
    assert (out / "predictions.jsonl").read_text() == ""

    # by hand: documents + eos concatenated, cut into blocks of 32, every next token scored
    model, tok = _load(tiny_model)
    stream = []
    for line in _read_jsonl(docs):
        stream += tok(line["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [stream[i:i + 32] for i in range(0, len(stream) - 31, 32)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(blocks)).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, torch.tensor(blocks)[:, 1:, None]).sum()
    count = len(blocks) * 31
    assert row["examples"] == len(blocks) and row["perplexity_tokens"] == count
    assert row["perplexity"] == pytest.approx(math.exp(float(nll) / count), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit
# ----------------------------------------------------------------------------------------------

def _bad_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "unknown": _write_jsonl(tmp_path / "unknown.jsonl", [{"id": "0", "prediction": "#### 1"},
                                                             {"id": "9999", "prediction": "#### 2"},
                                                             {"id": "abc", "prediction": "#### 3"}]),
        "nokey": _write_jsonl(tmp_path / "nokey.jsonl", [{"id": "0", "prediction": "#### 1"},
                                                         {"id": "1", "answer": "#### 2"}]),
        "empty": _write_jsonl(tmp_path / "empty.jsonl", []),
        "dup": _write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prediction": "1"}, {"id": "1", "prediction": "2"}]),
    }


@pytest.mark.parametrize("args, expected", [
    (["predictions=@unknown"], re.compile(r"2 prediction id\(s\) .* not in dataset 'synthetic_math' split 'test' "
                                          r"\(32 examples\): '9999', 'abc'; ids are the row indices 0\.\.31")),
    (["predictions=@nokey"], re.compile(r"nokey\.jsonl:2: no 'prediction' key")),
    (["predictions=@empty"], re.compile(r"empty")),
    (["predictions=@dup"], re.compile(r"dup\.jsonl:2: id '1' .* already appeared on line 1")),
    (["predictions=/nonexistent/p.jsonl"], re.compile(r"does not exist")),
    ([], re.compile(r"nothing to evaluate; pass model\.name_or_path=PATH")),
    (["predictions=@empty", "include_teacher=true"], re.compile(r"give one source of outputs")),
    (["model.name_or_path=/nonexistent/model"], re.compile(r"model\.name_or_path '/nonexistent/model' does not exist")),
    (["checkpoints=[/nonexistent/ck]"], re.compile(r"checkpoint '/nonexistent/ck' is not a folder")),
    (["include_teacher=true", "eval.limit=0"], re.compile(r"eval\.limit must be >= 1, got 0")),
    (["include_teacher=true", "eval.batch_size=-1"], re.compile(r"eval\.batch_size must be >= 1, got -1")),
    (["include_teacher=true", "eval.max_new_tokens=0"], re.compile(r"eval\.max_new_tokens must be")),
    (["include_teacher=true", "eval.do_sample=true", "eval.temperature=0"], re.compile(r"eval\.temperature must be a finite number > 0")),
    (["dataset=text", "predictions=@dup"], re.compile(r"scored by perplexity, which needs a model")),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, expected):
    files = _bad_files(tmp_path)
    args = [re.sub(r"@(\w+)", lambda m: str(files[m.group(1)]), a) for a in args]
    synth = [] if any(a.startswith("dataset=") for a in args) else SMALL_SYNTH
    res = run_cli(["evaluate", *synth, *args, "trainer.progress=false", f"hydra.run.dir={tmp_path}/run"])
    assert res.exit_code != 0
    text = res.output.strip()
    assert "Traceback" not in text
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, text
    assert expected.search(error_lines[0]), text
