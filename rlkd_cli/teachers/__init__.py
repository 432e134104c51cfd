"""The ``teacher`` config group: where a run's teacher distributions come from.

* :mod:`~rlkd_cli.teachers.live` -- a teacher model run on every micro-batch (a hub id, a local
  folder, or the embedded tiny teacher);
* :mod:`~rlkd_cli.teachers.tiny` -- the embedded tiny teacher, trained with the sft engine on first use;
* :mod:`~rlkd_cli.teachers.cache` -- a top-K logit cache written by ``rlkd cache-teacher``
  (``teacher.cache=PATH``: no teacher forward at all).

:func:`resolve` turns a run config into a ready *teacher source* for the engine (see
:mod:`rlkd_cli.engine.step`); a new kind of teacher is one more module with ``rows``,
``describe`` and ``check``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from rlkd_cli import models


def resolve(cfg: DictConfig, tokenizer, runtime):
    """The teacher source of ``cfg.teacher``: the cache it names, else the live teacher (trained first if tiny)."""
    from rlkd_cli.teachers.cache import TeacherCache
    from rlkd_cli.teachers.live import LiveTeacher, load

    if cfg.teacher.get("cache"):
        return TeacherCache.open(cfg.teacher.cache, tokenizer=tokenizer, teacher_cfg=cfg.teacher)
    model, _ = load(cfg, tokenizer, runtime)
    split = bool(cfg.trainer.get("split_head", True)) and not runtime.sharded
    return LiveTeacher(model, len(tokenizer), split_head=split, name=models.describe(cfg.teacher))
