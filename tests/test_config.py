"""The config tree: typed schemas, experiment presets, composed loss presets, user loss plugins."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from conftest import QUICK, compose, run_cli, train
from rlkd_cli import schema
from rlkd_cli.errors import RlkdError
from rlkd_cli.losses import LOSSES, Objective


def test_experiment_presets_set_the_papers_settings():
    sft = compose("distill", ["experiment=paper_sft"])
    assert sft.loss.name == "kl+rank" and sft.loss.terms.rank.k == 5
    assert sft.loss.terms.rank.weight == 1.0 and sft.loss.terms.kl.weight == 0.5
    pre = compose("distill", ["experiment=paper_pretrain"])
    assert pre.dataset.kind == "text" and pre.loss.terms.rank.k == 15 and pre.loss.terms.kl.weight == 0.5
    smoke = compose("distill", ["experiment=smoke"])
    assert smoke.trainer.max_steps == 8 and smoke.student.arch.hidden_size == 32
    # any override still applies on top of an experiment
    assert compose("distill", ["experiment=paper_sft", "loss.terms.rank.k=7"]).loss.terms.rank.k == 7
    for cfg in (sft, pre, smoke):
        schema.validate(cfg)


def test_every_command_config_matches_its_schema():
    for command in schema.COMMANDS:
        schema.validate(compose(command, []))


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_step=3", "unknown key trainer.max_step; did you mean trainer.max_steps?"),
    ("+dataset.max_lenght=32", "unknown key dataset.max_lenght; did you mean dataset.max_length?"),
    ("+student.pef.r=8", "unknown key student.pef; did you mean student.peft?"),
    ("+foo=1", "unknown key foo"),
    ("trainer.betas=[1.5,0.9]", "trainer.betas must be a list of numbers (each >= 0 and < 1), got 1.5"),
    ("trainer.eval_examples=-1", "trainer.eval_examples must be >= 1, got -1"),
    ("trainer.lr=inf", "trainer.lr must be a finite number > 0, got inf"),
    ("+teacher.train_if_missing.max_stepz=3", "unknown key teacher.train_if_missing.max_stepz"),
])
def test_validate_rejects_what_composition_lets_through(override, message):
    with pytest.raises(RlkdError) as info:
        schema.validate(compose("distill", [override]))
    assert message in str(info.value)


def test_check_types_and_ranges_of_plain_dicts():
    schema.check({"max_steps": 3, "lr": 0.1}, schema.TrainerConfig, "trainer")
    for node, message in [({"max_steps": True}, "trainer.max_steps must be an integer >= 1, got True"),
                          ({"max_steps": "3"}, "trainer.max_steps must be an integer >= 1, got '3'"),
                          ({"lr": float("nan")}, "trainer.lr must be a finite number > 0, got nan"),
                          ({"device": "tpu"}, "trainer.device must be one of auto, cpu, cuda, got 'tpu'"),
                          ({"stop_after": 0}, "trainer.stop_after must be >= 1, got 0")]:
        with pytest.raises(RlkdError, match=message.replace("(", r"\(").replace(")", r"\)")):
            schema.check(node, schema.TrainerConfig, "trainer")


def test_rank_presets_are_composed_from_the_divergence_and_rank_presets():
    rank = compose("distill", ["loss=rank"]).loss.terms.rank
    for d in ("kl", "rkl", "js", "gjsd", "tvd", "skl", "srkl", "akl"):
        alone = compose("distill", [f"loss={d}"]).loss.terms[d]
        mixed = compose("distill", [f"loss={d}+rank"]).loss
        assert mixed.name == f"{d}+rank" and list(mixed.terms) == ["rank", d]
        assert mixed.terms.rank == rank
        assert {k: v for k, v in mixed.terms[d].items() if k != "weight"} == \
               {k: v for k, v in alone.items() if k != "weight"} and mixed.terms[d].weight == 0.5


def test_null_term_is_removed_not_weight_one():
    obj = Objective.from_config(compose("distill", ["loss.terms.kl=null"]).loss)
    assert [key for key, *_ in obj.terms] == ["rank"]
    with pytest.raises(RlkdError, match="every loss term is null"):
        Objective.from_config(compose("distill", ["loss.terms.kl=null", "loss.terms.rank=null"]).loss)


PLUGIN = '''
from rlkd_cli.losses import apply_divergence, register_loss


@register_loss("sq_plugin")
def squared_distance(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", scale=1.0):
    """scale * sum_v (p_T - p_S)^2 per position."""
    return apply_divergence(lambda ls, lt: scale * ((lt.exp() - ls.exp()) ** 2).sum(-1), student_logits,
                            teacher_logits, mask, temperature=temperature, reduction=reduction)
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_losses.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.chdir(tmp_path)  # a user's own package in the working directory
    yield "my_pkg.my_losses"
    for name in ("sq_plugin", "squared_distance"):
        LOSSES.pop(name, None)
    for name in [m for m in sys.modules if m.startswith("my_pkg")]:
        del sys.modules[name]
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_a_users_loss_module_is_registered_from_config(plugin_module):
    cfg = compose("distill", [f"loss.plugins=[{plugin_module}]", "+loss.terms.sq_plugin.weight=2",
                              "+loss.terms.sq_plugin.scale=3"])
    obj = Objective.from_config(cfg.loss)
    assert [key for key, *_ in obj.active_terms] == ["rank", "kl", "sq_plugin"]
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    _, parts = obj(s, t)
    expected = 3.0 * ((torch.softmax(t, -1) - torch.softmax(s, -1)) ** 2).sum(-1).mean()
    assert parts["sq_plugin"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.slow
def test_distill_with_a_plugin_loss_end_to_end(plugin_module, tmp_path):
    summary = train("distill", QUICK + [f"loss.plugins=[{plugin_module}]", "+loss.terms.sq_plugin.weight=1",
                                        "trainer.max_steps=2", "trainer.eval_every=0"], tmp_path / "run")
    assert summary["status"] == "completed" and "sq_plugin" in summary["loss_mix"]
    assert "loss/sq_plugin" in json.loads((tmp_path / "run" / "summary.json").read_text())


def test_a_missing_plugin_is_one_line(tmp_path):
    res = run_cli(["distill", *QUICK, "loss.plugins=[no_such_pkg.losses]", f"hydra.run.dir={tmp_path}/run"])
    assert res.exit_code == 2
    assert "error: loss plugin module 'no_such_pkg.losses' cannot be imported" in res.output
    assert "Traceback" not in res.output
