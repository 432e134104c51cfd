"""Losses by name: the registry behind the ``loss`` config group, and user plugins.

A loss is registered with :func:`register_loss` under its function name and any aliases; the
``loss`` config group then uses it by any of those names, and every keyword option of the
function becomes a config key of its term. ``loss.plugins=[my_pkg.my_losses]`` imports user
modules before the objective is built, so a module whose functions carry the decorator adds its
losses with no edit of rlkd (:func:`load_plugins`).

A loss may also register a *row kernel* (``rows=``): the same computation on rows the caller has
already validated and selected (``[N, V]`` student logits, the matching teacher rows), returning
``[N]`` per-row values. The training engine evaluates the objective through the kernels, so no
check runs again inside every chunk of every step; a loss without a kernel is called through its
public function instead (with its checks).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Iterable

import torch

from rlkd_cli.errors import RlkdError

#: Every loss by name: canonical names (the function's ``__name__``) and aliases.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {}

# Options the Objective does not pass as keyword options (they come from its own arguments).
_NOT_OPTIONS = {"reduction", "labels"}


def register_loss(*names: str, rows: Callable[..., torch.Tensor] | None = None
                  ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a loss under its ``__name__`` and the given aliases.

    The function must follow the common signature
    ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", **options)``
    where every option is keyword-only with a default. ``rows`` is its optional row kernel (see the
    module docstring): ``rows(student_rows, teacher_rows, *, temperature, **options) -> [N]``.
    """

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        all_names = (fn.__name__, *names)
        for name in all_names:
            existing = LOSSES.get(name)
            if existing is not None and existing is not fn and not _same_definition(existing, fn):
                raise ValueError(f"loss name {name!r} is already registered for {existing.__name__}")
        for name in all_names:
            LOSSES[name] = fn
        fn.loss_names = tuple(dict.fromkeys(all_names))  # type: ignore[attr-defined]
        fn.loss_rows = rows  # type: ignore[attr-defined]
        return fn

    return decorator


def _same_definition(a: Callable, b: Callable) -> bool:
    """A module imported twice (a plugin reloaded) registers the same function again: not a clash."""
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def available_losses() -> list[str]:
    """All registered names (canonical names and aliases), sorted."""
    return sorted(LOSSES)


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss registered under ``name``; :class:`RlkdError` listing the available names otherwise."""
    fn = LOSSES.get(name) if isinstance(name, str) else None
    if fn is None:
        raise RlkdError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    return fn


def canonical_name(name: str) -> str:
    """The canonical name (function name) of a registered loss or alias."""
    return get_loss(name).__name__


def loss_options(fn: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """The keyword options a loss accepts in a config term, with their defaults."""
    out: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_OPTIONS:
            out[p.name] = p.default
    return out


def load_plugins(modules: Iterable[str] | None) -> list[str]:
    """Import each module of ``loss.plugins`` (its ``@register_loss`` functions register themselves).

    A module is looked up on ``sys.path`` and, failing that, relative to the working directory (the
    ``rlkd`` console script does not put it on the path). Returns the names registered by them.
    """
    before = set(LOSSES)
    for name in modules or []:
        if not isinstance(name, str) or not name.strip():
            raise RlkdError(f"loss.plugins must list module names like my_pkg.my_losses, got {name!r}")
        try:
            _import(name)
        except ModuleNotFoundError as e:
            raise RlkdError(f"loss plugin module '{name}' cannot be imported ({e}); put it on PYTHONPATH or in "
                            "the working directory, or fix loss.plugins") from e
        except RlkdError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's module failed while importing
            raise RlkdError(f"loss plugin module '{name}' failed while importing ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); fix the module or drop it from loss.plugins") from e
    return sorted(set(LOSSES) - before)


def _import(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        cwd = os.getcwd()
        if cwd in sys.path:
            raise
        sys.path.append(cwd)
        importlib.import_module(name)
