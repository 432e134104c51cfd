"""A weighted sum of registered losses, built from the ``loss`` config group (:class:`Objective`)."""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Callable, Mapping

import torch

from rlkd_cli.errors import RlkdError
from rlkd_cli.losses.core import (_OPTION_CHECKS, _check_logits, _check_positive, _check_reduction, _is_real,
                                  _positions, _reduce, _rows)
from rlkd_cli.losses.divergences import cross_entropy
from rlkd_cli.losses.ranking import check_k, ranking_loss
from rlkd_cli.losses.registry import LOSSES, available_losses, load_plugins, loss_options
from rlkd_cli.losses.topk import _check_teacher, _teacher_rows

log = logging.getLogger("rlkd.losses")

_CONFIG_KEYS = ("name", "terms", "temperature", "description", "plugins")
_TERM_KEYS = ("weight", "fn")

Term = tuple[str, Callable[..., torch.Tensor], float, dict[str, Any]]


def _to_plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class Objective:
    """A weighted sum of registered losses, built from the ``loss`` config group.

    Config shape (an OmegaConf ``DictConfig`` or a plain dict)::

        name: kl+rank
        temperature: 1.0          # optional; used by every term that does not set its own
        plugins: []               # modules to import first (their @register_loss functions)
        terms:
          kl:   {weight: 0.5}
          rank: {weight: 1.0, k: 5, index_set: union, tau: 1.0}
          rank15: {fn: rank, weight: 0.5, k: 15}   # `fn` reuses a loss under another key

    Each key of ``terms`` is a registered loss name or alias, or any key with ``fn: <name>``.
    ``weight`` defaults to 1.0; every other key is a keyword option of that loss, validated
    against its signature. A term set to ``null`` (``loss.terms.kl=null``) is removed from the
    mix. The top-level ``temperature`` applies to every term without its own, except
    cross-entropy (ground-truth CE stays at temperature 1 unless its term sets one). Terms with
    weight 0 are not computed and are not part of the total.

    One set of positions is scored for every term: ``mask`` (all positions if ``None``) and, when
    ``labels`` are given, only positions whose label is not an ignore index (-100 and the
    ``ignore_index`` of any cross-entropy term). :meth:`position_mask` returns that set, so an
    engine that uses ``reduction="sum"`` over chunks divides by ``position_mask(...).sum()``.
    """

    def __init__(self, terms: list[Term], name: str | None = None):
        self.name = name
        #: Every configured term, as (key, function, weight, keyword options passed to it).
        self.terms = list(terms)
        if not any(w > 0 for _, _, w, _ in self.terms):
            raise RlkdError(
                "all loss weights are zero: give at least one term a weight > 0 "
                f"(terms: {', '.join(k for k, *_ in self.terms) or 'none'})"
            )

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any) -> "Objective":
        """Build and validate an objective from a ``loss`` config (see the class docstring)."""
        cfg = _to_plain(cfg)
        if not isinstance(cfg, Mapping):
            raise RlkdError(f"the loss config must be a mapping with a 'terms' key, got {type(cfg).__name__}")
        unknown = [key for key in cfg if key not in _CONFIG_KEYS]
        if unknown:
            raise RlkdError(
                f"unknown key(s) {', '.join(map(str, unknown))} in the loss config; valid keys: "
                f"{', '.join(_CONFIG_KEYS)}{_nearest(str(unknown[0]), list(_CONFIG_KEYS))}"
            )
        load_plugins(cfg.get("plugins") or [])
        temperature = cfg.get("temperature", None)
        if temperature is not None:
            _check_positive("loss.temperature", temperature)
        terms_cfg = cfg.get("terms")
        if not isinstance(terms_cfg, Mapping) or not terms_cfg:
            raise RlkdError(
                "the loss config needs a non-empty 'terms' mapping, "
                "e.g. terms: {kl: {weight: 0.5}, rank: {weight: 1.0, k: 5}}"
            )
        removed = [str(k) for k, v in terms_cfg.items() if v is None]
        if removed:
            log.info("loss terms set to null are left out: %s", ", ".join(removed))
        terms = [_term(str(key), dict(term) if isinstance(term, Mapping) else term, temperature)
                 for key, term in terms_cfg.items() if term is not None]
        if not terms:
            raise RlkdError(f"every loss term is null ({', '.join(removed)}): keep at least one term, "
                            "e.g. loss.terms.kl.weight=1")
        return cls(terms, name=cfg.get("name"))

    # -- properties ------------------------------------------------------------------------

    @property
    def active_terms(self) -> list[Term]:
        """The terms with weight > 0 (the ones that are computed)."""
        return [term for term in self.terms if term[2] > 0]

    @property
    def needs_teacher(self) -> bool:
        """Whether any active term reads the teacher's logits (False for pure cross-entropy)."""
        return any(fn is not cross_entropy for _, fn, _, _ in self.active_terms)

    @property
    def needs_labels(self) -> bool:
        """Whether any active term reads ground-truth labels (cross-entropy)."""
        return any(fn is cross_entropy for _, fn, _, _ in self.active_terms)

    def _ignore_indices(self) -> list[int]:
        ids = {-100}
        for _, fn, _, options in self.terms:
            if fn is cross_entropy:
                ids.add(int(options.get("ignore_index", -100)))
        return sorted(ids)

    def position_mask(
        self, mask: torch.Tensor | None, labels: torch.Tensor | None, shape: torch.Size | tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        """The bool mask of positions every term scores: ``mask`` and ``labels`` not ignored.

        ``shape`` (the positions' shape) is only needed when both ``mask`` and ``labels`` are
        ``None``, in which case the result is ``None`` (every position).
        """
        keep = None if mask is None else (torch.as_tensor(mask) != 0)
        if labels is not None:
            lab_keep = torch.ones_like(labels, dtype=torch.bool)
            for ignore in self._ignore_indices():
                lab_keep &= labels != ignore
            keep = lab_keep if keep is None else (keep.to(lab_keep.device) & lab_keep)
        return keep

    def check(self, vocab: int, teacher: Any = None) -> None:
        """Once, before training: every term's options fit a vocabulary of ``vocab`` (and a cached teacher's K)."""
        for _, fn, _, options in self.active_terms:
            if fn is ranking_loss:
                check_k(int(options.get("k", 5)), vocab, teacher)

    # -- evaluation ------------------------------------------------------------------------

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: Any = None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and each active term's unweighted, detached value keyed by term key.

        With ``reduction="mean"`` every value is the mean over the scored positions (see
        :meth:`position_mask`); with ``"sum"`` the total and every term are sums over them (the
        caller divides by the count); with ``"none"`` they are per-position tensors.
        ``teacher_logits`` may be dense logits or a :class:`~rlkd_cli.losses.TopKLogits` (a teacher cache).
        """
        _check_reduction(reduction)
        _check_logits("student_logits", student_logits)
        if self.needs_teacher:
            if teacher_logits is None:
                raise RlkdError(f"the loss {self.describe()} needs teacher logits")
            _check_teacher(student_logits, teacher_logits)
        if self.needs_labels and labels is None:
            raise RlkdError(f"the loss {self.describe()} needs labels (ground-truth token ids)")
        batch_shape = student_logits.shape[:-1]
        if labels is not None and tuple(labels.shape) != tuple(batch_shape):
            raise RlkdError(
                f"labels have shape {tuple(labels.shape)} but the logits have positions of shape {tuple(batch_shape)}"
            )
        keep = self.position_mask(mask, labels)
        pos = _positions(student_logits.shape, keep, student_logits.device)
        s_rows = _rows(student_logits, pos)
        t_rows = _teacher_rows(teacher_logits, pos) if (self.needs_teacher and teacher_logits is not None) else None
        y_rows = None
        if labels is not None:
            y = labels.to(student_logits.device).reshape(-1)
            y_rows = y if pos.index is None else y.index_select(0, pos.index)
        total = None
        parts: dict[str, torch.Tensor] = {}
        for key, fn, weight, options in self.active_terms:
            if fn is cross_entropy:
                value = fn(s_rows, None, None, labels=y_rows, reduction=reduction, **options)
            else:
                value = fn(s_rows, t_rows, None, reduction=reduction, **options)
            if reduction == "none":
                value = _reduce(value, pos, "none")
            parts[key] = value.detach()
            total = weight * value if total is None else total + weight * value
        assert total is not None  # at least one active term (checked in __init__)
        return total, parts

    def rows_sum(self, s_rows: torch.Tensor, t_rows: Any, y_rows: torch.Tensor | None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``__call__(..., reduction="sum")`` on rows the caller vouches for: no checks, no position selection.

        The engine's path (every chunk of every step): ``s_rows`` ``[N, V]`` student logits, ``t_rows`` the
        teacher's rows (dense or :class:`~rlkd_cli.losses.TopKLogits`), ``y_rows`` ``[N]`` target ids, all
        at scored positions. Each term runs its registered row kernel (a term without one, through its
        public function). Call :meth:`check` once before.
        """
        if self.needs_labels and any(i != -100 for i in self._ignore_indices()):
            return self(s_rows, t_rows, y_rows, None, reduction="sum")  # a custom ignore_index selects rows
        total = None
        parts: dict[str, torch.Tensor] = {}
        for key, fn, weight, options in self.active_terms:
            rows = getattr(fn, "loss_rows", None)
            if fn is cross_entropy:
                value = rows(s_rows, None, labels=y_rows, **options).sum()
            elif rows is not None:
                value = rows(s_rows, t_rows, **options).sum()
            else:
                value = fn(s_rows, t_rows, None, reduction="sum", **options)
            parts[key] = value.detach()
            total = weight * value if total is None else total + weight * value
        return total, parts

    # -- display ---------------------------------------------------------------------------

    def describe(self) -> str:
        """A one-line formula of the active terms, e.g. ``1.0·rank(k=5) + 0.5·kl``."""
        pieces = []
        for key, fn, weight, options in self.active_terms:
            shown = {k: v for k, v in options.items() if not (k == "temperature" and v == 1.0)}
            opts = []
            if key not in getattr(fn, "loss_names", (fn.__name__,)):
                opts.append(f"fn={fn.__name__}")
            opts += [f"{k}={v}" for k, v in shown.items()]
            pieces.append(f"{weight}·{key}" + (f"({', '.join(opts)})" if opts else ""))
        return " + ".join(pieces)

    def __repr__(self) -> str:
        return f"Objective({self.describe()})"


def _term(key: str, term: Any, temperature: float | None) -> Term:
    """One ``terms`` entry: its loss function, weight and checked keyword options."""
    if not isinstance(term, Mapping):
        raise RlkdError(f"loss term {key!r} must be a mapping like {{weight: 1.0}}, got {term!r}")
    term = dict(term)
    fn_name = term.pop("fn", key)
    fn = LOSSES.get(fn_name) if isinstance(fn_name, str) else None
    if fn is None:
        where = f"loss term {key!r}" + (f" (fn: {fn_name!r})" if fn_name != key else "")
        raise RlkdError(f"{where} is not a registered loss; available: {', '.join(available_losses())} (or give "
                        f"the term fn: <name>){_nearest(str(fn_name), available_losses())}")
    weight = term.pop("weight", 1.0)
    if not _is_real(weight) or not math.isfinite(weight) or weight < 0:
        raise RlkdError(f"loss term {key!r}: weight must be a finite number >= 0, got {weight!r}")
    valid = loss_options(fn)
    for opt in term:
        if opt not in valid:
            raise RlkdError(f"loss term {key!r} ({fn.__name__}) has no option {opt!r}; valid options: "
                            f"{', '.join([*_TERM_KEYS, *valid])}{_nearest(str(opt), [*_TERM_KEYS, *valid])}")
    for opt, value in term.items():
        check = _OPTION_CHECKS.get(opt)
        if check is not None:
            check(f"loss term {key!r}: {opt}", value)
    options = dict(term)
    inherits = "temperature" in valid and fn is not cross_entropy
    if inherits and "temperature" not in options and temperature is not None:
        options["temperature"] = temperature
    return key, fn, float(weight), options
