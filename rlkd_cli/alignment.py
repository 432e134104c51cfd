"""``rlkd measure-alignment``: how well checkpoints reproduce the teacher's top-k order.

For each checkpoint (any Hugging Face causal LM folder that shares the teacher's tokenizer) and the
teacher, over the response positions of a dataset split: CR@k (ordered top-k lists identical),
OR@k (top-k overlap / k), top-1 agreement (= CR@1), the checkpoint's and the teacher's perplexity of
the reference tokens, and CR/OR split by how multi-modal the teacher is at the position. Prints a
rich table (one row per checkpoint) and writes ``alignment.json`` in the run dir.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlkd_cli import metrics as metrics_mod
from rlkd_cli import models
from rlkd_cli.data import dataset as data_mod
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.data.loader import eval_batches, pad_id
from rlkd_cli.errors import require
from rlkd_cli.io import atomic_write_json, ensure_writable_dir
from rlkd_cli.losses import cross_entropy
from rlkd_cli.metrics import shift_for_next_token

log = logging.getLogger("rlkd.alignment")


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """Summed negative log-likelihood of the reference tokens at the counted positions."""
    return float(cross_entropy(logits, None, mask, labels=targets, reduction="sum"))


def load_checkpoints(checkpoints: list[str], tokenizer, device, dtype: torch.dtype | None) -> list:
    """The checkpoints as models in eval mode, checked (tokenizer, vocabulary, finite weights) before the
    teacher is loaded, so a bad one is refused without waiting for the teacher."""
    students = []
    for path in checkpoints:
        tok_mod.check_model_tokenizer(path, tokenizer, role="checkpoint")
        model = models.load_pretrained(path, role="checkpoint", dtype=dtype)
        models.check_vocab(model, tokenizer, role=f"checkpoint '{path}'")
        students.append(model.to(device).eval())
    return students


@torch.no_grad()
def measure(checkpoints: list[str], teacher, tokenizer, batches: list[dict[str, torch.Tensor]], ks: list[int],
            device: str, dtype: torch.dtype | None, students: list | None = None
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Teacher perplexity and, per checkpoint, alignment metrics; teacher logits computed once per batch.
    ``students``: the checkpoints already loaded (:func:`load_checkpoints`), else loaded here."""
    vocab = len(tokenizer)
    if students is None:
        students = load_checkpoints(checkpoints, tokenizer, device, dtype)
    teacher_nll, count = 0.0, 0.0
    sums: list[dict[str, float]] = [{} for _ in students]
    nll = [0.0 for _ in students]
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        t_dev = next(teacher.parameters()).device  # teacher.device may put it elsewhere
        t_logits = teacher(input_ids=batch["input_ids"].to(t_dev),
                           attention_mask=batch["attention_mask"].to(t_dev)).logits.to(device)
        t, targets, mask = shift_for_next_token(t_logits, batch["labels"], vocab)
        teacher_nll += _nll_sum(t, targets, mask)
        count += float(mask.sum())
        for i, model in enumerate(students):
            s_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s = shift_for_next_token(s_logits, batch["labels"], vocab)[0]
            nll[i] += _nll_sum(s, targets, mask)
            for key, value in metrics_mod.alignment_sums(s, t, ks, mask).items():
                sums[i][key] = sums[i].get(key, 0.0) + float(value)
            for key, value in metrics_mod.alignment_sums_by_modes(s, t, ks, mask).items():
                sums[i][key] = sums[i].get(key, 0.0) + float(value)
    require(count > 0, "the dataset split has no response tokens to measure; check dataset and split")
    teacher_row = {"teacher_ppl": math.exp(min(teacher_nll / count, 50.0)), "positions": int(count)}
    rows = []
    for path, s, n in zip(checkpoints, sums, nll):
        row = {"checkpoint": path, **metrics_mod.finalize(s), "ppl": math.exp(min(n / count, 50.0))}
        row["top1"] = row.get("cr@1")
        rows.append(row)
    return teacher_row, rows


def run(cfg: DictConfig, out_dir: Path, *, runtime, tokenizer) -> dict[str, Any]:
    """``rlkd measure-alignment``: measure ``cfg.checkpoints`` against the teacher; write ``alignment.json``."""
    from rlkd_cli.teachers import live

    out_dir = ensure_writable_dir(out_dir)
    checkpoints = [str(c) for c in (cfg.get("checkpoints") or [])]
    require(len(checkpoints) > 0, "no checkpoints to measure; pass checkpoints=[PATH,...] "
            "(e.g. checkpoints=[outputs/distill/RUN/checkpoints/step-000300])")
    for c in checkpoints:
        require(Path(c).expanduser().is_dir(), f"checkpoint '{c}' is not a folder; pass model folders written "
                "by rlkd (checkpoints/step-*) or save_pretrained")
    ks = sorted(set(int(k) for k in cfg.metrics.ks))
    dtype = torch.bfloat16 if runtime.precision == "bf16" else None
    students = load_checkpoints(checkpoints, tokenizer, runtime.device, dtype)
    teacher, teacher_path = live.load(cfg, tokenizer, runtime)
    split = data_mod.build_split(cfg.dataset, tokenizer, str(cfg.split), limit=cfg.get("limit"),
                                 cache_dir=Path(str(cfg.cache_dir)).expanduser() / "datasets")
    batches = eval_batches(split.dataset, batch_size=int(cfg.get("batch_size", 32)), pad_token_id=pad_id(tokenizer))
    log.info("measuring %d checkpoint(s) against teacher %s on %s/%s (%d examples)", len(checkpoints),
             teacher_path, cfg.dataset.get("name"), cfg.split, len(split.dataset))
    teacher_row, rows = measure(checkpoints, teacher, tokenizer, batches, ks, runtime.device, dtype, students)
    result = {"teacher": str(teacher_path), "dataset": cfg.dataset.get("name"), "split": str(cfg.split),
              "examples": len(split.dataset), "ks": ks, **teacher_row, "checkpoints": rows}
    atomic_write_json(out_dir / "alignment.json", result)
    _print_table(result, ks)
    return result


def _print_table(result: dict[str, Any], ks: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Alignment with the teacher ({result['dataset']}/{result['split']}, "
                        f"{result['positions']} positions; teacher ppl {result['teacher_ppl']:.3f})")
    table.add_column("checkpoint", no_wrap=True)
    for k in ks:
        table.add_column(f"CR@{k}", justify="right")
    for k in ks:
        table.add_column(f"OR@{k}", justify="right")
    table.add_column("ppl", justify="right")
    for row in result["checkpoints"]:
        table.add_row(short_label(row["checkpoint"]), *[f"{row[f'cr@{k}']:.4f}" for k in ks],
                      *[f"{row[f'or@{k}']:.4f}" for k in ks], f"{row['ppl']:.3f}")
    console = Console()
    if not console.is_terminal:  # logs and pipes: no 80-column squeeze
        console = Console(width=200)
    console.print(table)


def short_label(path: str) -> str:
    """``.../<run>/checkpoints/step-000300`` -> ``<run>/step-000300``; other paths: their last two parts."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return f"{parts[-3]}/{parts[-1]}"
    return "/".join(parts[-2:])
