"""The validation pass: mean loss terms, student perplexity and CR@k/OR@k over response positions."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rlkd_cli import metrics as metrics_mod
from rlkd_cli.engine.step import Trainer, batch_objective


@torch.no_grad()
def validate(trainer: Trainer, batches: Sequence[dict[str, torch.Tensor]], ks: Sequence[int]) -> dict[str, float]:
    """Mean loss terms, ``ppl`` and (with a teacher) CR@k/OR@k, also split by teacher modes, over ``batches``.

    With several processes each takes every ``world``-th batch and the sums are added up; every
    process runs the same number of forwards (DDP broadcasts buffers and FSDP gathers parameters in
    each one), the short ones repeating their first batch and dropping its sums.
    """
    rt = trainer.runtime
    trainer.module.eval()
    sums: dict[str, float] = {}
    mine = list(batches[rt.rank::rt.world])
    try:
        for i in range(math.ceil(len(batches) / rt.world)):
            batch = {k: v.to(rt.device) for k, v in (mine[i] if i < len(mine) else batches[0]).items()}
            out = batch_objective(trainer, batch, split="validation",
                                  align_ks=ks if trainer.teacher is not None else None, by_modes=True, nll=True)
            if i < len(mine):
                metrics_mod.add_sums(sums, {"loss": float(out.total.detach()), "nll": out.nll or 0.0,
                                            "positions": out.count,
                                            **{f"loss/{k}": v for k, v in out.terms.items()}, **out.align})
    finally:
        trainer.module.train()
    sums = rt.sum_dicts(sums)
    count = max(float(sums.pop("positions", 0.0)), 1.0)
    nll = sums.pop("nll", 0.0)
    align = {k: v for k, v in sums.items() if k.startswith(("cr@", "or@", "top1", "count"))}
    out = {k: v / count for k, v in sums.items() if k not in align}
    out["ppl"] = math.exp(min(nll / count, 50.0))
    if align:
        out.update(metrics_mod.finalize(align))
    out["positions"] = int(count)
    return out
