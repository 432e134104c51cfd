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

    @torch.no_grad()
    def rows(self, batch: dict[str, torch.Tensor], idx: torch.Tensor, split: str | None = None) -> TeacherRows:
        """The teacher's final hidden rows (or logits) at the batch's scored positions ``idx``."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.head is not None:
            hidden = trunk_forward(self.model, ids, mask)
        else:
            hidden = self.model(input_ids=ids, attention_mask=mask).logits
        return TeacherRows(gather_rows(hidden, idx), self.head, self.vocab)

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
    model = models.load_pretrained(path, role="teacher",
                                   dtype=torch.bfloat16 if runtime.precision == "bf16" else None,
                                   trust_remote_code=bool(tc.get("trust_remote_code", False)))
    models.check_vocab(model, tokenizer, role="teacher")
    model.requires_grad_(False).eval().to(runtime.device)
    return model, path
