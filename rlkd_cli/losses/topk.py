"""Top-k selection and top-K teachers: a teacher's distribution kept as its K largest logits (a teacher cache).

Also the two helpers every loss uses to accept either form of teacher (dense logits or
:class:`TopKLogits`): :func:`_prepare` (checks and the counted rows) and :func:`_teacher_rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rlkd_cli.errors import RlkdError
from rlkd_cli.losses.core import (LOGP_FLOOR, _check_k, _check_logits, _check_positive, _compute_dtype,
                                  _log_probs, _positions, _Positions, _rows)

#: :func:`top_k` cuts rows into blocks of this many entries on the CPU.
TOPK_BLOCK = 64


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries along the last axis, in decreasing order.

    The same as ``x.topk(k, dim=-1)``, faster on the CPU for a small ``k`` over a long last axis
    (a vocabulary): there ``torch.topk`` selects within a copy of each row, about 4x slower than
    this. Each row is cut into blocks of :data:`TOPK_BLOCK` entries; one vectorised max pass finds
    every block's maximum; the ``k`` blocks with the largest maxima hold every top-``k`` entry (a
    block whose maximum exceeds the ``k``-th largest value contains a top-``k`` entry itself, so
    at most ``k`` blocks qualify), and the top-``k`` is taken among their ``k * 64`` entries.
    Values are identical to ``torch.topk``; among entries tied at the ``k``-th value the choice of
    ids may differ (it is implementation-defined for ``torch.topk`` too). Elsewhere (CUDA, short
    rows) this is ``torch.topk``.
    """
    V = x.shape[-1]
    b = TOPK_BLOCK
    if x.device.type != "cpu" or V < 4 * k * b or x.numel() == 0:
        out = x.topk(k, dim=-1, sorted=True)
        return out.values, out.indices
    lead = x.shape[:-1]
    flat = x.reshape(-1, V)
    n, nb = flat.shape[0], V // b
    blocks = flat[:, :nb * b].reshape(n, nb, b)
    best = blocks.amax(-1).topk(k, dim=-1, sorted=False).indices  # [n, k] blocks
    cand = blocks.gather(1, best.unsqueeze(-1).expand(n, k, b)).reshape(n, k * b)
    cand_ids = (best.unsqueeze(-1) * b + torch.arange(b, device=x.device)).reshape(n, k * b)
    if nb * b < V:  # the ragged last block always takes part
        cand = torch.cat([cand, flat[:, nb * b:]], dim=1)
        cand_ids = torch.cat([cand_ids, torch.arange(nb * b, V, device=x.device).expand(n, -1)], dim=1)
    values, pos = cand.topk(k, dim=-1, sorted=True)
    return values.reshape(*lead, k), cand_ids.gather(1, pos).reshape(*lead, k)


def _same_temperature(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


@dataclass(frozen=True)
class TopKLogits:
    r"""A teacher's next-token distributions kept as their top-K logits, as a teacher cache stores them.

    Fields, for positions of shape ``[...]`` (``[N]`` for rows):

    * ``ids`` ``[..., K]``: the K token ids of largest teacher logit, by decreasing logit;
    * ``logits`` ``[..., K]``: their raw logits :math:`z_v` (temperature 1), any float dtype;
    * ``log_normalizer`` ``[..., T]``: :math:`\log Z_\tau = \mathrm{logsumexp}_v\, z_v/\tau` over the
      whole vocabulary, one column per temperature in ``temperatures``;
    * ``tail_log_mass`` ``[..., T]``: :math:`\log r_\tau`, the log of the teacher probability *outside*
      the K ids at each temperature (``-inf`` when the K ids carry all of it);
    * ``temperatures``: the temperatures of those columns.

    The teacher's probability of a cached id is :math:`p_T(v) = \exp(z_v/\tau - \log Z_\tau)`
    exactly; how the tail mass :math:`r_\tau` spreads over the other ids is unknown. Divergences
    therefore compare the two distributions *lumped* onto K+1 bins (:func:`lumped_log_probs`), and
    :func:`ranking_loss` ranks student ids outside the cache below the K-th cached logit.

    Build one from dense logits with :meth:`from_logits` (what ``rlkd cache-teacher`` stores).
    """

    ids: torch.Tensor
    logits: torch.Tensor
    log_normalizer: torch.Tensor
    tail_log_mass: torch.Tensor
    temperatures: tuple[float, ...] = (1.0,)

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The positions' shape (``ids.shape`` without the K axis)."""
        return self.ids.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: torch.Tensor, k: int, temperatures: Any = (1.0,)) -> "TopKLogits":
        """The exact top-``k`` summary of dense logits ``[..., V]`` at the given temperatures."""
        _check_logits("logits", logits)
        _check_k("k", k)
        temps = tuple(float(t) for t in temperatures)
        if not temps:
            raise RlkdError("temperatures must list at least one temperature, e.g. [1.0]")
        for t in temps:
            _check_positive("temperature", t)
        k = min(k, logits.shape[-1])
        z = logits.to(_compute_dtype(logits))
        values, ids = top_k(z, k)
        rest = z.scatter(-1, ids, -math.inf)
        norms, tails = [], []
        for t in temps:
            norm = torch.logsumexp(z / t, dim=-1)
            norms.append(norm)
            tails.append(torch.logsumexp(rest / t, dim=-1) - norm)
        return cls(ids=ids, logits=values.to(logits.dtype), log_normalizer=torch.stack(norms, -1),
                   tail_log_mass=torch.stack(tails, -1), temperatures=temps)

    def check_against(self, student_logits: torch.Tensor) -> None:
        """Shapes and ids must fit ``student_logits`` ``[..., V]``; one line naming the mismatch otherwise."""
        for name in ("ids", "logits", "log_normalizer", "tail_log_mass"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise RlkdError(f"TopKLogits.{name} must be a tensor")
        if self.ids.is_floating_point() or self.ids.dtype == torch.bool:
            raise RlkdError(f"TopKLogits.ids must be an integer tensor, got dtype {self.ids.dtype}")
        if tuple(self.logits.shape) != tuple(self.ids.shape):
            raise RlkdError(f"TopKLogits.logits {tuple(self.logits.shape)} and ids {tuple(self.ids.shape)} differ in shape")
        n_t = len(self.temperatures)
        for name in ("log_normalizer", "tail_log_mass"):
            shape = tuple(getattr(self, name).shape)
            if shape != (*self.shape, n_t):
                raise RlkdError(f"TopKLogits.{name} has shape {shape}, expected {(*self.shape, n_t)} "
                                f"(positions x {n_t} temperature(s))")
        if tuple(self.shape) != tuple(student_logits.shape[:-1]):
            raise RlkdError(f"the cached teacher has positions of shape {tuple(self.shape)} but the student logits "
                            f"{tuple(student_logits.shape)}; both must cover the same positions")
        vocab = student_logits.shape[-1]
        if self.ids.numel() and (int(self.ids.min()) < 0 or int(self.ids.max()) >= vocab):
            raise RlkdError(f"the cached teacher has token ids outside the student's vocabulary [0, {vocab}); "
                            "teacher cache and student must share the tokenizer")

    def select(self, index: torch.Tensor | None) -> "TopKLogits":
        """The positions ``index`` of the flattened positions as rows (all of them for ``None``)."""
        def rows(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            return flat if index is None else flat.index_select(0, index.to(flat.device))

        return TopKLogits(rows(self.ids), rows(self.logits), rows(self.log_normalizer), rows(self.tail_log_mass),
                          self.temperatures)

    def __getitem__(self, rows: slice) -> "TopKLogits":
        """A slice of rows (the leading axis)."""
        return TopKLogits(self.ids[rows], self.logits[rows], self.log_normalizer[rows], self.tail_log_mass[rows],
                          self.temperatures)

    def to(self, device: torch.device | str) -> "TopKLogits":
        return TopKLogits(self.ids.to(device), self.logits.to(device), self.log_normalizer.to(device),
                          self.tail_log_mass.to(device), self.temperatures)

    def column(self, temperature: float) -> int:
        """The index of ``temperature`` among :attr:`temperatures`; a clear error if it was not cached."""
        for i, t in enumerate(self.temperatures):
            if _same_temperature(t, temperature):
                return i
        raise RlkdError(f"the cached teacher has log-normalisers for temperature(s) "
                        f"{', '.join(f'{t:g}' for t in self.temperatures)} but a loss term uses temperature "
                        f"{temperature:g}; rebuild the cache with that temperature (rlkd cache-teacher "
                        f"cache.temperatures=[{temperature:g}])")

    def log_probs(self, temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p_T of the K ids [..., K], log tail mass [...])`` at ``temperature``, floored at LOGP_FLOOR.

        The K log-probabilities are renormalised so that, with the tail mass, they sum to one: a
        no-op up to float rounding for float32 logits; for bfloat16/float16 logits it absorbs their
        rounding (about 0.4 % resp. 0.05 % of each probability near logit 20), so divergences and
        their closed-form gradients stay those of a proper distribution.
        """
        c = self.column(temperature)
        z = self.logits.to(dtype)
        if temperature != 1.0:
            z = z / temperature
        tail = self.tail_log_mass[..., c].to(dtype)
        lp = z - self.log_normalizer[..., c:c + 1].to(dtype)
        if self.logits.dtype not in (torch.float32, torch.float64):
            head_mass = torch.log1p(-tail.exp().clamp_max(1.0 - 1e-7))  # log(1 - r_T)
            lp = lp + (head_mass - torch.logsumexp(lp, dim=-1)).unsqueeze(-1)
        return lp.clamp_min(LOGP_FLOOR), tail.clamp_min(LOGP_FLOOR)


def lumped_log_probs(student_logits: torch.Tensor, teacher: TopKLogits, *, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Student and teacher distributions lumped onto the teacher's K cached ids plus one tail bin.

    Returns ``(log_q, log_p)``, each ``[..., K+1]`` and floored at :data:`LOGP_FLOOR`: entries
    ``0..K-1`` are the log-probabilities of the cached ids, entry ``K`` the log of the mass of every
    other id. For the teacher, :math:`z_v/\tau - \log Z_\tau` and :math:`\log r_\tau` from the cache;
    for the student, :math:`\log\mathrm{softmax}(s/\tau)` at the ids and the exact log-sum-exp of the
    rest (no ``1 - sum`` cancellation). Gradients flow into ``student_logits``.

    Any divergence :math:`D` evaluated on these two (K+1)-bin distributions is the divergence of
    the two distributions *coarse-grained* by the partition {each cached id} ∪ {the rest}. For every
    f-divergence (forward and reverse KL, JS and generalized JSD, TVD, skew KL and skew reverse KL)
    the data-processing inequality gives :math:`D_\mathrm{lumped} \le D_\mathrm{exact}`, with
    equality when, outside the cache, the student's distribution is proportional to the teacher's;
    e.g. the forward KL misses exactly :math:`r_T\,\mathrm{KL}(p_T^\mathrm{tail} \| p_S^\mathrm{tail})`
    (tail-normalised distributions). The error is at most of the order of the tail mass.
    """
    _check_logits("student_logits", student_logits)
    teacher.check_against(student_logits)
    return _lumped(student_logits, teacher, temperature)


def _lumped(student_logits: torch.Tensor, teacher: TopKLogits, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lumped_log_probs` without the checks (rows the caller has validated)."""
    dtype = _compute_dtype(student_logits)
    ls_full = _log_probs(student_logits, temperature, dtype)
    ids = teacher.ids.long().to(ls_full.device)
    ls_top = ls_full.gather(-1, ids)
    in_cache = torch.zeros_like(ls_full, dtype=torch.bool).scatter_(-1, ids, True)
    # exact log of the student's mass outside the cached ids; cached entries are pushed to the floor
    # (a finite value, so an empty tail gives a floored value and finite gradients, not NaN)
    ls_tail = torch.logsumexp(ls_full.masked_fill(in_cache, LOGP_FLOOR), dim=-1).clamp_min(LOGP_FLOOR)
    lt_top, lt_tail = teacher.to(ls_full.device).log_probs(temperature, dtype)
    return (torch.cat([ls_top, ls_tail.unsqueeze(-1)], dim=-1),
            torch.cat([lt_top, lt_tail.unsqueeze(-1)], dim=-1))


# --------------------------------------------------------------------------------------------
# Either form of teacher
# --------------------------------------------------------------------------------------------

def _check_teacher(student_logits: torch.Tensor, teacher_logits: Any) -> None:
    """The teacher is dense logits of the student's shape, or a :class:`TopKLogits` of its positions."""
    if isinstance(teacher_logits, TopKLogits):
        teacher_logits.check_against(student_logits)
        return
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise RlkdError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; cut both to the tokenizer's vocabulary with rlkd_cli.losses.align_vocab"
        )


def _teacher_rows(teacher_logits: Any, pos: _Positions) -> Any:
    return teacher_logits.select(pos.index) if isinstance(teacher_logits, TopKLogits) else _rows(teacher_logits, pos)


def _prepare(student_logits: torch.Tensor, teacher_logits: Any, mask: torch.Tensor | None):
    _check_logits("student_logits", student_logits)
    _check_teacher(student_logits, teacher_logits)
    pos = _positions(student_logits.shape, mask, student_logits.device)
    return _rows(student_logits, pos), _teacher_rows(teacher_logits, pos), pos
