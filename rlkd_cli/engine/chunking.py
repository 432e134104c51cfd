r"""The loss over response positions, in chunks: no full-size ``[B, T, V]`` float32 tensor ever exists.

The engine (:mod:`rlkd_cli.engine`, the ``trainer`` group) computes every step's loss here:

1. Only *response* positions count, so the models' final hidden states are gathered at those
   positions first (:func:`response_index`, :func:`gather_rows`): ``[N, H]`` rows, ``N`` the
   number of scored positions of the micro-batch.
2. The positions are cut into chunks of ``chunk_size`` rows. For each chunk the LM heads are
   applied (``[n, V]`` logits, in the model's dtype), the :class:`~rlkd_cli.losses.Objective` is
   evaluated on those logits (float32 inside the loss functions) and, when training, its
   gradient with respect to the chunk's hidden rows and the student's head weights is taken at
   once; then the chunk's logits and float32 temporaries are freed. Peak memory for the loss is
   one chunk's worth, whatever the batch and sequence length.
3. :func:`objective_over_chunks` wraps that loop in one autograd function whose backward hands
   the collected gradients to the student's trunk: one forward, one backward per micro-batch, so
   DDP's gradient hooks and gradient accumulation behave as with an ordinary loss.

This is the technique of fused linear-loss kernels (the head matmul and the loss evaluated
together per chunk, gradients computed in the forward pass), written in plain PyTorch so that
every registered loss works with it. The arithmetic is the same as an unchunked loss: the total
is a sum over positions, so chunked and unchunked results agree up to floating-point summation
order (tested).

A model whose logits are not ``head(base_model(x).last_hidden_state)`` with a plain linear head
(optionally soft-capped or scaled, see :class:`LMHead`) is detected by :func:`split_lm`'s check
and falls back to the model's own full logits, gathered at the response positions; the loss is
still chunked and never upcast as a whole.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from rlkd_cli import metrics as metrics_mod
from rlkd_cli.losses import Objective
from rlkd_cli.losses.divergences import _cross_entropy_rows

log = logging.getLogger("rlkd.chunking")

#: ``trainer.chunk_size: auto`` makes a chunk hold about this many logits on a GPU (128 MiB per
#: float32 ``[n, V]`` temporary): 1024 positions at V = 32k, 256 at V = 128k; 8x fewer on the CPU.
AUTO_CHUNK_ELEMENTS = 1 << 25


def resolve_chunk_size(value: Any, vocab: int, device: torch.device | str) -> int:
    """``trainer.chunk_size``: an integer number of positions, or ``auto``.

    ``auto`` holds :data:`AUTO_CHUNK_ELEMENTS` logits per chunk on a GPU, and 8x fewer on the CPU
    (16 MiB float32 temporaries: below glibc's 32 MiB mmap threshold, freed buffers are reused
    instead of being mapped and page-faulted again for every chunk, which costs more than the
    arithmetic).
    """
    if value is None or str(value) == "auto":
        elements = AUTO_CHUNK_ELEMENTS // (8 if torch.device(device).type == "cpu" else 1)
        return max(16, elements // max(vocab, 1))
    return int(value)


# ----------------------------------------------------------------------------------------------
# Splitting a causal LM into trunk (final hidden states) and head (logits)
# ----------------------------------------------------------------------------------------------

@dataclass
class LMHead:
    r"""A causal LM's output layer: ``logits = post(h W^T + b)`` for the first ``vocab`` rows of ``W``.

    ``post`` is the identity, or what some model families apply after the linear layer:
    multiplying by ``scale`` (Cohere's ``logit_scale``; Granite divides by ``logits_scaling``) and
    soft-capping :math:`c \tanh(x / c)` (Gemma 2's ``final_logit_softcapping``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    _cast: Any = field(default=None, init=False, repr=False, compare=False)  # a frozen head's weights, cast

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def cast(self, vocab: int, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``vocab`` rows of the weight and bias (detached) in ``dtype`` (``None``: as they are).

        A trainable head is cast anew on each call (its weights change every step); a frozen one (a
        LoRA student's, a teacher's) is cast once and the copy kept, so a step allocates no ``[V, H]``
        tensor for it at all.
        """
        w = self.weight.detach()[:vocab]
        b = None if self.bias is None else self.bias.detach()[:vocab]
        if dtype is None or w.dtype == dtype:
            return w, b
        frozen = not any(p.requires_grad for p in self.params)
        # the copy is valid for these weights as they are now: same storage, not written to since
        key = (vocab, dtype, w.device, *((p.data_ptr(), p._version) for p in self.params))
        if frozen and self._cast is not None and self._cast[0] == key:
            return self._cast[1], self._cast[2]
        w, b = w.to(dtype), (None if b is None else b.to(dtype))
        if frozen:
            self._cast = (key, w, b)
        return w, b

    def linear(self, h: torch.Tensor, vocab: int) -> torch.Tensor:
        """``h W^T + b`` for the first ``vocab`` rows (no post-processing), in the autocast dtype if on."""
        if any(p.requires_grad for p in self.params):  # trainable: differentiable (autocast casts as usual)
            return F.linear(h, self.weight[:vocab], None if self.bias is None else self.bias[:vocab])
        kind = h.device.type  # frozen (a teacher's, a LoRA student's): the weight cast once, kept
        w, b = self.cast(vocab, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)
        return F.linear(h, w, b)

    def post(self, z: torch.Tensor) -> torch.Tensor:
        """What follows the linear layer (differentiable): scale, then soft-cap."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def __call__(self, h: torch.Tensor, vocab: int) -> torch.Tensor:
        return self.post(self.linear(h, vocab))


def _head_of(model) -> LMHead | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    cfg = get_text() if callable(get_text) else cfg
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(head.weight, head.bias, scale=scale, softcap=float(softcap) if softcap else None)


def trunk_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states ``[B, T, H]`` (after the last norm) of a Hugging Face causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA (peft) model's own LM
    base = lm.base_model
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class Trunk(torch.nn.Module):
    """Wraps a causal LM so that ``forward`` returns its final hidden states, not its logits.

    The engine hands this wrapper to ``accelerator.prepare``, so under DDP the trunk runs through
    the DDP forward (which arms the gradient all-reduce) and the head is applied per chunk.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return trunk_forward(self.lm, input_ids, attention_mask)


@torch.no_grad()
def split_lm(model, vocab: int, sample: torch.Tensor | None = None) -> LMHead | None:
    """The model's :class:`LMHead` if ``head(trunk(x))`` reproduces ``model(x).logits``, else ``None``.

    ``sample`` (``[1, T]`` token ids) is run both ways once, in eval mode, and compared; a model
    that does anything else between its last hidden state and its logits is caught here and the
    engine uses its full logits instead.
    """
    head = _head_of(model)
    if head is None or getattr(model, "base_model", model) is model:
        return None
    if sample is None:
        sample = torch.arange(min(8, vocab), device=head.weight.device).unsqueeze(0)
    sample = sample.to(head.weight.device)
    mask = torch.ones_like(sample)
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=sample, attention_mask=mask).logits[..., :vocab].float()
        split = head(trunk_forward(model, sample, mask), vocab).float()
    except Exception as e:  # an architecture whose base model cannot be called like this
        log.info("LM head not split (%s: %s); using the model's full logits", type(e).__name__, e)
        return None
    finally:
        model.train(was_training)
    scale = 1.0 + float(full.abs().max())
    err = float((full - split).abs().max()) if full.shape == split.shape else math.inf
    tol = (2e-2 if full.dtype != torch.float32 or head.weight.dtype != torch.float32 else 1e-4) * scale
    if not err <= tol:
        log.info("LM head not split: head(hidden) differs from the model's logits by %.3g; using full logits", err)
        return None
    return head


# ----------------------------------------------------------------------------------------------
# Rows: the response positions of a micro-batch
# ----------------------------------------------------------------------------------------------

def response_index(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into ``[B*T]`` of the positions that predict a response token, and those tokens.

    Position ``(b, t)`` predicts ``labels[b, t+1]``; it counts when that label is not ``ignore_index``.
    Indices are in row-major order (example by example, left to right).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != ignore_index
    idx = keep.reshape(-1).nonzero().squeeze(-1)
    return idx, labels.reshape(-1).index_select(0, idx + 1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``x`` ``[B, T, D]`` flattened to ``[B*T, D]`` (differentiable)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, idx)


@dataclass
class StudentRows:
    """The student at the scored positions: hidden rows with its :class:`LMHead`, or logit rows (``head=None``)."""

    rows: torch.Tensor
    head: LMHead | None
    vocab: int


@dataclass
class TeacherRows:
    """The live teacher at the scored positions; ``rows[sl]`` gives that chunk's logits ``[n, V]``."""

    rows: torch.Tensor
    head: LMHead | None
    vocab: int
    out_device: torch.device | None = None   # where the logits go (a teacher on another device)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, sl: slice) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.rows.device.type, enabled=False):  # in the teacher's dtype
            x = self.rows[sl]
            z = self.head(x, self.vocab) if self.head is not None else x[:, :self.vocab]
            if self.out_device is None:
                return z
            # asynchronous only into a GPU (a copy into host memory must be complete before the CPU reads it)
            return z.to(self.out_device, non_blocking=self.out_device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# The chunked objective
# ----------------------------------------------------------------------------------------------

@dataclass
class ChunkResult:
    """What :func:`objective_over_chunks` returns for one micro-batch (sums over its positions)."""

    total: torch.Tensor                 # weighted loss sum (differentiable when training)
    terms: dict[str, float]             # each term's unweighted sum
    align: dict[str, float]             # CR/OR sums and counts (when asked for)
    nll: float | None                   # summed cross-entropy of the targets (when asked for)
    count: int                          # scored positions


def chunk_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


class _Loop:
    """One pass over the chunks; with ``grad`` it also collects the gradients of the total.

    Per chunk the head's linear output ``z`` (``[n, V]``) is a leaf: the loss's gradient ``g_z`` is
    taken by autograd (through the head's post-processing and every loss term), and the linear
    layer's backward is done by hand: ``g_h = g_z W`` into the chunk's rows and ``g_W += g_z^T h``
    accumulated into one buffer (in place with float32 matmuls; under bf16 autocast through one
    bf16 ``[V, H]`` temporary per chunk, which the CUDA caching allocator reuses).
    """

    def __init__(self, objective: Objective, student: StudentRows, teacher, targets: torch.Tensor, chunk: int,
                 align_ks: Sequence[int] | None, by_modes: bool, nll: bool):
        self.objective, self.student, self.teacher, self.targets = objective, student, teacher, targets
        self.chunk, self.align_ks, self.by_modes, self.nll = chunk, align_ks, by_modes, nll
        self.terms: dict[str, torch.Tensor] = {}
        self.align: dict[str, float] = {}
        self.nll_sum: torch.Tensor | None = None

    def _extras(self, s: torch.Tensor, t: Any, y: torch.Tensor) -> None:
        s = s.detach()
        if self.nll:
            value = _cross_entropy_rows(s, labels=y).sum()
            self.nll_sum = value if self.nll_sum is None else self.nll_sum + value
        if self.align_ks and t is not None:
            metrics_mod.add_sums(self.align, metrics_mod.alignment_sums(s, t, self.align_ks))
            if self.by_modes:
                metrics_mod.add_sums(self.align, metrics_mod.alignment_sums_by_modes(s, t, self.align_ks))

    def run(self, grad: bool):
        """``(total, grad_rows, grad_params)``; the gradients are ``None`` without ``grad``.

        The head's matmuls run in the autocast dtype when autocast is on (bf16 on CUDA), with the
        weight cast once per call; the losses always run with autocast off (in float32 inside).
        """
        rows, head, vocab = self.student.rows, self.student.head, self.student.vocab
        params = head.params if head is not None else []
        device_type = rows.device.type
        dt = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        w = b = None
        if head is not None:  # the head's weights in the matmul dtype, cast once (not once per chunk)
            w, b = head.cast(vocab, dt)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if grad and rows.requires_grad else None
        if grad_rows is not None and head is None and vocab < rows.shape[-1]:
            grad_rows[:, vocab:] = 0  # vocabulary padding: no gradient
        want = [grad and p.requires_grad for p in params]
        grad_params: list[torch.Tensor | None] = [None] * len(params)  # allocated by the first chunk
        grad = grad and (grad_rows is not None or any(want))
        for sl in chunk_slices(int(rows.shape[0]), self.chunk):
            r = rows[sl].detach()
            if dt is not None:
                r = r.to(dt)
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                z = F.linear(r, w, b) if head is not None else r[:, :vocab]
                t = self.teacher[sl] if self.teacher is not None else None  # (teacher rows cast as they are)
            with torch.set_grad_enabled(grad), torch.autocast(device_type, enabled=False):
                z = z.requires_grad_(grad)
                s = head.post(z) if head is not None else z
                y = self.targets[sl]
                value, terms = self.objective.rows_sum(s, t, y)
                if grad:
                    g_z, = torch.autograd.grad(value, z)
                    if head is None:
                        grad_rows[sl, :vocab] = g_z
                    else:
                        _linear_backward(g_z, r, w, vocab, grad_rows, sl, grad_params, want, params)
                total += value.detach().float()
                for key, v in terms.items():
                    self.terms[key] = self.terms[key] + v.float() if key in self.terms else v.float()
                self._extras(s, t, y)
        for i, p in enumerate(params):  # no scored position at all: zero gradients (DDP waits for every one)
            if want[i] and grad_params[i] is None:
                grad_params[i] = torch.zeros_like(p)
        return total, grad_rows, grad_params


def _linear_backward(g_z: torch.Tensor, r: torch.Tensor, w: torch.Tensor, vocab: int,
                     grad_rows: torch.Tensor | None, sl: slice, grad_params: list[torch.Tensor | None],
                     want: list[bool], params: list[torch.Tensor]) -> None:
    """Backward of ``z = r w^T + b`` (``w``: the head's first ``vocab`` rows, in the matmul dtype): the rows'
    gradient into ``grad_rows[sl]``; W's and b's accumulated in ``grad_params`` (allocated by the first
    chunk, in the parameters' dtype; in place when dtypes agree, as on the CPU in float32)."""
    dt = g_z.dtype
    if grad_rows is not None:
        grad_rows[sl] = torch.mm(g_z, w.to(dt))
    for i, p in enumerate(params):
        if not want[i]:
            continue
        first = grad_params[i] is None
        if first:
            grad_params[i] = torch.zeros_like(p) if vocab < p.shape[0] else torch.empty_like(p)
            first = vocab >= p.shape[0]
        acc = grad_params[i][:vocab]
        if i == 1:  # the bias
            part = g_z.sum(0).to(acc.dtype)
            acc.copy_(part) if first else acc.add_(part)
        elif acc.dtype == dt == r.dtype:
            torch.mm(g_z.t(), r, out=acc) if first else acc.addmm_(g_z.t(), r)
        else:  # bf16 matmul, float32 accumulator: one [V, H] temporary in the matmul dtype
            part = torch.mm(g_z.t(), r.to(dt))
            acc.copy_(part) if first else acc.add_(part)


class _ChunkedLoss(torch.autograd.Function):
    """Forward: the loop above with gradients; backward: those gradients times the incoming one."""

    @staticmethod
    def forward(ctx, loop: _Loop, rows: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        total, grad_rows, grad_params = loop.run(grad=True)
        ctx.grad_rows, ctx.grad_params = grad_rows, grad_params
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grad_params is None:
            raise RuntimeError("the chunked loss's gradients were already used: backward through it only once")
        grads = [ctx.grad_rows, *ctx.grad_params]
        ctx.grad_rows = ctx.grad_params = None
        for g in grads:  # scaled in place: these buffers belong to this backward alone
            if g is not None:
                g.mul_(grad_out.to(g.dtype))
        return (None, grads[0], *[g if g is not None else None for g in grads[1:]])


def objective_over_chunks(objective: Objective, student: StudentRows, teacher, targets: torch.Tensor, *,
                          chunk_size: int, align_ks: Sequence[int] | None = None, by_modes: bool = False,
                          nll: bool = False) -> ChunkResult:
    """The objective summed over all rows, evaluated ``chunk_size`` rows at a time.

    ``teacher``: ``None`` (sft), :class:`TeacherRows` (live teacher) or
    :class:`~rlkd_cli.losses.TopKLogits` rows (teacher cache). When grad is enabled and the
    student's rows or head require grad, the returned ``total`` is differentiable: its backward
    feeds the gradients collected chunk by chunk into the student's rows and head parameters.
    ``align_ks``/``by_modes``/``nll`` add CR/OR sums and the targets' NLL (all detached).
    """
    loop = _Loop(objective, student, teacher, targets, chunk_size, align_ks, by_modes, nll)
    params = student.head.params if student.head is not None else []
    needs_grad = torch.is_grad_enabled() and (student.rows.requires_grad or any(p.requires_grad for p in params))
    if needs_grad:
        total = _ChunkedLoss.apply(loop, student.rows, *params)
    else:
        total = loop.run(grad=False)[0]
    terms = {k: float(v) for k, v in loop.terms.items()}
    return ChunkResult(total=total, terms=terms, align=loop.align,
                       nll=None if loop.nll_sum is None else float(loop.nll_sum), count=int(student.rows.shape[0]))
