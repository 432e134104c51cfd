"""The live teacher: a causal LM run on each micro-batch under ``no_grad``, its LM head applied per chunk."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig

from rlkd_cli import models
from rlkd_cli.engine.chunking import TeacherRows, gather_rows, split_lm, trunk_forward


class LiveTeacher:
    """A teacher model as the engine's teacher source (``rows``, ``describe``, ``check``)."""

    def __init__(self, model, vocab: int, *, split_head: bool = True, name: str = "teacher"):
        self.model, self.vocab, self.name = model, vocab, name
        self.head = split_lm(model, vocab) if split_head else None
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def rows(self, batch: dict[str, torch.Tensor], idx: torch.Tensor, split: str | None = None) -> TeacherRows:
        """The teacher's final hidden rows (or logits) at the batch's scored positions ``idx``.

        The teacher runs on its own device (``teacher.device``) in its own dtype (``teacher.dtype``:
        autocast is off for it, so an fp32 teacher computes in fp32 under bf16 training); each chunk's
        logits come back on the batch's device.
        """
        out = batch["input_ids"].device
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with torch.autocast(self.device.type, enabled=False):  # the teacher computes in its own dtype
            if self.head is not None:
                hidden = trunk_forward(self.model, ids, mask)
            else:
                hidden = self.model(input_ids=ids, attention_mask=mask).logits
        return TeacherRows(gather_rows(hidden, idx.to(self.device)), self.head, self.vocab,
                           out_device=out if out != self.device else None)

    def describe(self) -> str:
        return self.name

    def check(self, objective: Any, ks: Sequence[int], splits: Mapping[str, Any]) -> None:
        """A live teacher covers any objective, k and data."""


def load(cfg: DictConfig, tokenizer, runtime) -> tuple[torch.nn.Module, str]:
    """The teacher model ready to teach: trained first if it is the tiny one, loaded, checked against the
    run's tokenizer, frozen, in eval mode, on the runtime's device. Returns ``(model, path)``."""
    from rlkd_cli.data.tokenizer import check_model_tokenizer
    from rlkd_cli.teachers import tiny

    tc = cfg.teacher
    if tc.get("name_or_path"):
        path = str(tc.name_or_path)
    else:
        from rlkd_cli.errors import require

        require(bool(tc.get("arch")), "the teacher config has neither name_or_path nor arch; set "
                                      "teacher.name_or_path=PATH_OR_HUB_ID")
        path = str(tiny.ensure_trained(cfg, tokenizer, runtime))
    check_model_tokenizer(path, tokenizer, role="teacher")
    model = models.load_pretrained(path, role="teacher", dtype=teacher_dtype(tc, runtime),
                                   trust_remote_code=bool(tc.get("trust_remote_code", False)))
    models.check_vocab(model, tokenizer, role="teacher")
    model.requires_grad_(False).eval().to(teacher_device(tc, runtime))
    return model, path


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_dtype(tc: DictConfig, runtime) -> torch.dtype | None:
    """``teacher.dtype``: ``auto`` is bf16 under bf16 training, else the checkpoint's own (fp32 for rlkd's)."""
    name = str(tc.get("dtype", "auto"))
    if name == "auto":
        return torch.bfloat16 if runtime.precision == "bf16" else None
    from rlkd_cli.errors import require

    require(name in _DTYPES, f"teacher.dtype '{name}' is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def teacher_device(tc: DictConfig, runtime) -> torch.device:
    """``teacher.device``: ``null`` is the student's device; else a device this machine has (e.g. ``cuda:1``)."""
    from rlkd_cli.errors import RlkdError, require

    if not tc.get("device"):
        return runtime.device
    try:
        device = torch.device(str(tc.device))
    except RuntimeError as e:
        raise RlkdError(f"teacher.device '{tc.device}' is not a device name; use e.g. cpu, cuda, cuda:1") from e
    if device.type == "cuda":
        count = torch.cuda.device_count()
        require(count > 0, f"teacher.device={tc.device}, but this machine has no CUDA device; drop teacher.device "
                           "or set it to cpu")
        require((device.index or 0) < count, f"teacher.device={tc.device}, but this machine has {count} CUDA "
                                             f"device(s) (cuda:0..cuda:{count - 1}); choose one of them")
    else:
        require(device.type == "cpu", f"teacher.device={tc.device}: rlkd places teachers on cpu or cuda devices")
    if runtime.distributed and device.type == "cuda":  # decided alike on every process
        raise RlkdError(f"teacher.device={tc.device} with {runtime.world} processes would put every process's "
                        "teacher on that one GPU; drop teacher.device under DDP (each process's teacher goes on "
                        "its own GPU) or use teacher.device=cpu")
    return device
