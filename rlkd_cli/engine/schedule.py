"""The learning-rate schedule across a resume whose ``trainer.max_steps`` changed.

The schedule (``trainer.scheduler`` with ``trainer.warmup_steps``) spans ``trainer.max_steps``; a
resumed run restores its position, but the length comes from the new config, so a changed
``max_steps`` would silently re-stretch it (a cosine that reached 0 at step 8 jumps back up at
step 9). ``trainer.on_max_steps_change`` says what to do instead:

* ``refuse`` (default): one line naming the change and the two choices;
* ``continue``: keep the checkpoint's schedule (its start and length): a lower ``max_steps`` stops
  early on that curve, steps past its end keep its last learning rate;
* ``restart``: a new schedule (warmup, then decay) over the steps from the checkpoint's to the new
  ``max_steps``.

The schedule in force is kept in each checkpoint's ``trainer_state.json`` (``schedule_start``,
``schedule_steps``), so a later resume continues the same one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from rlkd_cli.engine.checkpoint import TrainState
from rlkd_cli.errors import RlkdError

log = logging.getLogger("rlkd.engine")

CHOICES = ("refuse", "continue", "restart")


def decide(state: TrainState, saved: DictConfig, cfg: DictConfig, label: str) -> tuple[int, int]:
    """``(start, length)`` of the schedule the resumed run follows (see the module docstring)."""
    start = state.schedule_start
    length = state.schedule_steps or int(saved.trainer.max_steps) - start
    new = int(cfg.trainer.max_steps)
    if start + length == new:
        return start, length
    if new < state.step:
        raise RlkdError(f"cannot resume: trainer.max_steps={new} is below the checkpoint's step {state.step}; "
                        f"pass trainer.max_steps >= {state.step}")
    policy = str(cfg.trainer.get("on_max_steps_change", "refuse"))
    old = start + length
    if policy == "continue":
        log.warning("[%s] trainer.max_steps changed from %d to %d: the learning-rate schedule continues as it was "
                    "(its %d steps from step %d%s)", label, old, new, length, start,
                    "; the steps past its end keep its last learning rate" if new > old else "")
        return start, length
    if policy == "restart":
        log.warning("[%s] trainer.max_steps changed from %d to %d: the learning-rate schedule restarts at step %d "
                    "(%s, %d warmup steps, over the %d steps to %d)", label, old, new, state.step,
                    cfg.trainer.scheduler, int(cfg.trainer.warmup_steps), new - state.step, new)
        return state.step, new - state.step
    raise RlkdError(f"cannot resume: trainer.max_steps changed from {old} to {new}, which changes the learning-rate "
                    f"schedule ({cfg.trainer.scheduler} over {old} steps); set trainer.on_max_steps_change=continue "
                    "(keep the schedule as it was) or trainer.on_max_steps_change=restart (a new schedule from step "
                    f"{state.step} to {new}), or resume with trainer.max_steps={old}")


def _lambda(tc: DictConfig, length: int):
    """The schedule's multiplier of the base learning rate, per step since its start (transformers' own)."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_scheduler(str(tc.scheduler), probe, num_warmup_steps=int(tc.warmup_steps),
                          num_training_steps=max(length, 1))
    if not hasattr(sched, "lr_lambdas"):
        raise RlkdError(f"trainer.scheduler={tc.scheduler} cannot be continued or restarted at another length; "
                        "resume with the checkpoint's trainer.max_steps")
    return sched.lr_lambdas[0]


def apply(scheduler: Any, tc: DictConfig, start: int, length: int) -> None:
    """Make the (restored) ``scheduler`` follow the schedule ``(start, length)`` from its current step on."""
    if start == 0 and length == int(tc.max_steps):
        return  # the schedule the trainer was built with
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
    fn = _lambda(tc, length)

    def shifted(step: int) -> float:
        return fn(min(max(step - start, 0), length))

    inner.lr_lambdas = [shifted for _ in inner.optimizer.param_groups]
    step = inner.last_epoch
    for group, base in zip(inner.optimizer.param_groups, inner.base_lrs):
        group["lr"] = base * shifted(step)  # the next step's learning rate, on the schedule in force
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
