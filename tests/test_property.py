"""Property tests: random overrides and random JSON Lines rows never end in a traceback.

Every generated case either succeeds or ends in exactly one ``error:`` line with exit code 2 (a
user error); never a traceback, never "unexpected" (exit 1, a bug). The cases are derandomized
(the same ones on every run, so a failure reproduces); 250 of each.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import compose, tokenizer_of  # noqa: E402
from rlkd_cli.errors import RlkdError  # noqa: E402

CASES = settings(max_examples=250, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

KEYS = ["trainer.max_steps", "trainer.lr", "trainer.batch_size", "trainer.grad_accum", "trainer.eval_examples",
        "trainer.betas", "trainer.device", "trainer.precision", "trainer.chunk_size", "trainer.stop_after",
        "trainer.threads", "trainer.scheduler", "trainer.max_grad_norm", "trainer.keep_last", "metrics.ks", "seed",
        "loss.terms.kl.weight", "loss.terms.rank.k", "loss.terms.rank.tau", "loss.terms.rank.index_set",
        "loss.temperature", "loss.terms.kl", "dataset.max_length", "dataset.limit", "dataset.num_train",
        "dataset.validation_size", "dataset.kind", "dataset.metric", "tokenizer.vocab_size", "logger.flush_secs",
        "student.peft.r", "student.peft.dropout", "teacher.dtype", "+trainer.max_step", "+dataset.max_lenght",
        "+loss.terms.kl.k", "+loss.terms.js.weight", "+foo", "~trainer.lr", "loss", "trainer", "logger", "experiment"]
VALUES = ["0", "1", "-1", "3", "-250", "1000000", "0.5", "-1.5", "1e30", "inf", "nan", "abc", "''", "null", "true",
          "[1,2]", "[]", "[0.9,1.5]", "[1,two]", "[0,1]", "auto", "cpu", "cuda", "tpu", "kl", "kl+rank", "debug",
          "union", "teacher", "smoke", "paper_sft", "tensorboard", "{a: 1}", "'quoted value'", "x y", "ä"]


def _validate(cfg) -> None:
    """What a command checks before it loads anything: the schema, the objective, the dataset config."""
    from rlkd_cli import schema
    from rlkd_cli.data.dataset import dataset_cfg
    from rlkd_cli.losses import Objective
    from rlkd_cli.runtime import choose_device_and_precision

    schema.validate(cfg)
    Objective.from_config(cfg.loss)
    dataset_cfg(cfg.dataset)
    choose_device_and_precision(cfg.trainer)


@pytest.fixture
def hydra_context():
    from hydra import initialize_config_dir

    from rlkd_cli import schema
    from rlkd_cli.config import conf_dir

    schema.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield


_RUNS = itertools.count()
SHARDS, PER_SHARD = 4, 32  # 128 seeded cases, in shards so that the test workers share them


@pytest.mark.parametrize("shard", range(SHARDS))
def test_random_overrides_are_valid_or_one_error_line(hydra_context, capsys, shard):
    """Compose + the commands' checks, errors formatted as the CLI formats them (rlkd_cli.hydra_run)."""
    import random

    from hydra import compose as hydra_compose

    from rlkd_cli.hydra_run import _check_group_choices, _one_line, composition_error

    rng = random.Random(1000 + shard)
    outcomes = {0: 0, 2: 0}
    for _ in range(PER_SHARD):
        pairs = [(rng.choice(KEYS), rng.choice(VALUES)) for _ in range(rng.randint(1, 4))]
        args = [k if k.startswith("~") else f"{k}={v}" for k, v in pairs]
        capsys.readouterr()
        try:
            _check_group_choices(args)
            try:
                cfg = hydra_compose(config_name="distill", overrides=args)
            except Exception as ex:  # noqa: BLE001 - as run_hydra treats what Hydra raises while composing
                error = composition_error(ex)
                if error is ex:
                    raise
                raise error from ex
            _validate(cfg)
            code = 0
        except Exception as ex:  # noqa: BLE001 - every exception must become one line, exit 2
            code = _one_line(ex, debug=False, command="distill")
        text = "".join(capsys.readouterr())
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert "Traceback" not in text and "unexpected" not in text, (args, text[-2000:])
        assert code in (0, 2), (args, code, text[-2000:])
        assert len(errors) == (1 if code == 2 else 0), (args, text[-2000:])
        outcomes[code] += 1
    assert outcomes[2] > 0  # the generator does reach the errors


CELL = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_subnormal=False),  # (training flushes subnormals)
                 st.text(max_size=40), st.sampled_from(["", " ", "\u2028", "x\u0085y", "é🙂", "#### 7"]),
                 st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ROW = st.dictionaries(st.sampled_from(["prompt", "response", "id", "extra"]), CELL, max_size=4)
LINE = st.one_of(ROW.map(lambda r: json.dumps(r, ensure_ascii=False, allow_nan=True)), st.sampled_from(
    ["", "   ", "{", "[1, 2]", "null", '"a string"', '{"prompt": "a", "response": "b"', "\ufeff{}"]))


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_of(compose("distill", []))


@CASES
@given(lines=st.lists(LINE, min_size=0, max_size=12), skip=st.booleans(), validation=st.integers(0, 4),
       max_length=st.integers(2, 40))
def test_random_json_lines_load_or_end_in_one_error(tmp_path_factory, tokenizer, lines, skip, validation, max_length):
    from rlkd_cli.data import dataset as D

    path = tmp_path_factory.getbasetemp() / "property-data" / f"{next(_RUNS)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8", errors="surrogatepass")
    cfg = {**D.DEFAULTS, "name": "jsonl", "path": str(path), "validation_size": validation, "skip_malformed": skip,
           "max_length": max_length}
    for split in ("train", "validation"):
        try:
            built = D.build_split(cfg, tokenizer, split)
        except RlkdError as e:
            assert "\n" not in str(e) and str(e), str(e)
            continue
        # a split that loads is sound: sequences within max_length, labels aligned, some response to learn
        assert 0 < len(built.dataset) == built.stats["num_examples"]
        for ids, labels in zip(built.dataset["input_ids"], built.dataset["labels"]):
            assert len(ids) == len(labels) <= max_length and any(t != -100 for t in labels)
        assert math.isfinite(built.stats["num_response_tokens"]) and built.stats["num_response_tokens"] > 0
