"""The training engine behind ``rlkd sft`` and ``rlkd distill`` (the ``trainer`` config group).

* :mod:`~rlkd_cli.engine.loop` -- :func:`train`, the loop, read top to bottom;
* :mod:`~rlkd_cli.engine.step` -- :class:`Trainer` and :func:`train_step`, one optimizer step;
* :mod:`~rlkd_cli.engine.chunking` -- the loss over response positions in chunks, LM heads per chunk;
* :mod:`~rlkd_cli.engine.validation` -- :func:`validate`;
* :mod:`~rlkd_cli.engine.checkpoint` -- atomic checkpoints, exact resume, safe loading;
* :mod:`~rlkd_cli.engine.rundir` -- one run per run dir, never silently reused;
* :mod:`~rlkd_cli.engine.trackers` (the ``logger`` group) and :mod:`~rlkd_cli.engine.progress`.

The engine imports no teacher and no command: the command hands :func:`train` a ready runtime,
tokenizer and teacher source (:mod:`rlkd_cli.teachers`).
"""

from rlkd_cli.engine.checkpoint import TrainState
from rlkd_cli.engine.loop import train
from rlkd_cli.engine.step import StepResult, TeacherSource, Trainer, batch_objective, train_step
from rlkd_cli.engine.validation import validate

__all__ = ["StepResult", "TeacherSource", "TrainState", "Trainer", "batch_objective", "train", "train_step",
           "validate"]
