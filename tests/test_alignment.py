"""measure-alignment on arbitrary HF folders: vocabulary padding, mismatches; the tiny teacher's cache lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import QUICK, REPO, TEACHER_ONLY, run_cli, train


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distilled")
    return Path(train("distill", QUICK + ["loss=kl"], out)["checkpoint"])


def _measure(tmp_path: Path, checkpoints: list[Path]) -> dict:
    out = tmp_path / "align"
    res = run_cli(["measure-alignment", *TEACHER_ONLY, "checkpoints=[" + ",".join(map(str, checkpoints)) + "]",
                   "limit=16", f"hydra.run.dir={out}"])
    assert res.exit_code == 0, res.output
    return json.loads((out / "alignment.json").read_text())


def test_vocabulary_padding_rows_are_ignored(distilled, tmp_path):
    """A copy of the checkpoint whose embedding has 64 extra rows measures exactly like the original."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(distilled)
    tok = AutoTokenizer.from_pretrained(distilled)
    model.resize_token_embeddings(len(tok) + 64)
    with torch.no_grad():  # make the padding rows win every argmax if they were (wrongly) read
        model.get_output_embeddings().weight[len(tok):] = 10.0
    padded = tmp_path / "padded"
    model.save_pretrained(padded)
    tok.save_pretrained(padded)
    result = _measure(tmp_path, [distilled, padded])
    a, b = result["checkpoints"]
    for key in ("cr@1", "cr@2", "cr@5", "or@5"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert "cr@2|modes=1" in a  # the multi-modality split is reported too


def test_smaller_vocabulary_is_a_clear_error(distilled, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(distilled)
    model.resize_token_embeddings(100)
    small = tmp_path / "small"
    model.save_pretrained(small)  # no tokenizer saved: only the vocabulary size can disagree
    res = run_cli(["measure-alignment", *TEACHER_ONLY, f"checkpoints=[{small}]", f"hydra.run.dir={tmp_path}/a"])
    assert res.exit_code != 0
    assert "100 vocabulary rows but the tokenizer has" in res.output and "Traceback" not in res.output


def test_concurrent_jobs_train_the_tiny_teacher_once(tmp_path):
    """Two processes asking for the same missing teacher: one trains it, the other waits and reuses it."""
    cache = tmp_path / "cache"
    overrides = QUICK + ["teacher.train_if_missing.max_steps=5", f"cache_dir={cache}"]
    code = textwrap.dedent(f"""
        import sys, logging
        sys.path.insert(0, {str(REPO / 'tests')!r})
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from conftest import compose, teacher_path
        cfg = compose("distill", {overrides!r})
        print("PATH", teacher_path(cfg))
    """)
    env = {**os.environ, "RLKD_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    trained = sum("training it now" in o for o in outs)
    assert trained == 1, outs
    paths = {line.split(" ", 1)[1] for o in outs for line in o.splitlines() if line.startswith("PATH ")}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert (path / "model.safetensors").exists() and not list(path.parent.glob(".tmp-*"))
