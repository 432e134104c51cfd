"""The ``rlkd`` command: Typer subcommands that hand their arguments to Hydra.

Every subcommand composes ``conf/<command>.yaml`` with the user's overrides, so everything Hydra
offers works as in any Hydra app: ``-m/--multirun`` sweeps, ``--cfg job``, ``--help``,
``hydra.run.dir=...``. Errors a user can fix are printed as one line and exit non-zero;
``--debug`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from rlkd_cli.config import GROUPS, conf_dir, group_options, groups_help
from rlkd_cli.errors import RlkdError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("rlkd")

_EPILOG = (
    "Each command takes Hydra overrides: group=option, key=value, -m for sweeps, --cfg job to print the config, "
    "--help for the command's config, --debug for tracebacks.\n\n"
    "Config groups and their options:\n\n" + groups_help().replace("\n", "\n\n")
)

app = typer.Typer(
    name="rlkd",
    help="Knowledge distillation of causal LMs with the RLKD ranking loss (Peng & Zhang, COLING 2025).",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

# Jobs of a multirun that failed (recorded by the task wrapper; the sweep goes on).
_FAILED_JOBS: list[tuple[str, str]] = []
# The exception of a failed single run, re-raised after Hydra returns (so Hydra prints nothing of its own).
_PENDING: list[BaseException] = []


def _check_group_choices(args: list[str]) -> None:
    """Unknown ``group=option`` values get one line listing the options (before Hydra composes)."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath", "+hydra.searchpath")) for a in args):
        return  # the user brings their own presets
    for arg in args:
        m = re.match(r"^~?\+{0,2}([A-Za-z_]+)=(.*)$", arg)
        if not m or m.group(1) not in GROUPS:
            continue
        group, value = m.group(1), m.group(2)
        choices = [v.strip() for v in re.sub(r"^(choice|glob)\((.*)\)$", r"\2", value).split(",")] \
            if not value.startswith(("glob(", "range(")) else []
        available = group_options(group)
        for choice in choices:
            if choice and choice not in available and choice.lower() not in ("null", "none"):
                raise RlkdError(f"unknown {group} '{choice}'; available: {', '.join(available)} "
                                f"(or add conf/{group}/{choice}.yaml)")


_DISK_FULL = ("the disk is full (no space left on device) while writing{where}; free some space, lower "
              "trainer.keep_last, or put the run on a disk with room (hydra.run.dir=..., RLKD_CACHE_DIR=...), "
              "then continue with trainer.resume=auto")


def _disk_full(ex: BaseException) -> bool:
    """True for an out-of-space error: errno ENOSPC/EDQUOT, or a library's wrapped message saying so."""
    import errno

    if isinstance(ex, OSError) and ex.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(ex)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def _format_hydra_error(ex: BaseException) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(ex, MissingConfigException):
        opts = f"; available: {', '.join(ex.options)}" if getattr(ex, "options", None) else ""
        first = str(ex).strip().splitlines()[0]
        return f"{first}{opts}"
    if isinstance(ex, OverrideParseException):
        return f"cannot parse the override '{ex.override}': {ex.message.strip().splitlines()[0]}; write key=value"
    if isinstance(ex, OmegaConfBaseException):
        msg = str(ex).strip().splitlines()[0]
        key = getattr(ex, "full_key", None)
        return f"config error{f' at {key}' if key else ''}: {msg}"
    text = " ".join(str(ex).split())
    if "Could not override" in text or "Key '" in text:
        # Hydra's override errors carry the useful part after the first sentence
        text = text.replace("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", "")
        return text.strip() + " (check the key's spelling with --cfg job; add a new key with +key=value)"
    return text


def run_hydra(command: str, task: Callable, args: list[str]) -> None:
    """Compose ``conf/<command>.yaml`` with ``args`` and run ``task(cfg)`` (once, or per sweep job)."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    debug = "--debug" in args or os.environ.get("HYDRA_FULL_ERROR") == "1"
    args = [a for a in args if a != "--debug"]
    _FAILED_JOBS.clear()
    _PENDING.clear()
    prev_argv, prev_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    try:
        _check_group_choices(args)
        args = _multiprocess_args(args)
        sys.argv = [f"rlkd {command}", *args]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # we format errors ourselves below
        hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")(_wrap_task(task))()
        if _PENDING:
            raise _PENDING.pop()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        raise typer.Exit(130)
    except RlkdError as ex:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {escape(str(ex))}")
        raise typer.Exit(ex.exit_code)
    except (HydraException, OmegaConfBaseException) as ex:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {escape(_format_hydra_error(ex))}")
        raise typer.Exit(2)
    except OSError as ex:
        if debug:
            raise
        where = f" '{ex.filename}'" if getattr(ex, "filename", None) else ""
        if _disk_full(ex):
            err_console.print(f"[bold red]error:[/bold red] {escape(_DISK_FULL.format(where=where))}")
            raise typer.Exit(2)
        err_console.print(f"[bold red]error:[/bold red] {escape(str(ex.strerror or ex) + where)}; check the path and its "
                          "permissions (the run dir is set with hydra.run.dir=...)")
        raise typer.Exit(2)
    except Exception as ex:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        if _disk_full(ex):  # e.g. safetensors' own I/O error on a full disk
            err_console.print(f"[bold red]error:[/bold red] {escape(_DISK_FULL.format(where=''))}")
            raise typer.Exit(2)
        err_console.print(f"[bold red]error:[/bold red] unexpected {type(ex).__name__}: "
                          f"{escape(' '.join(str(ex).split())[:400])} (rerun with --debug for the traceback)")
        raise typer.Exit(1)
    finally:
        sys.argv = prev_argv
        if prev_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = prev_env
    if _FAILED_JOBS:
        err_console.print(f"[bold red]{len(_FAILED_JOBS)} sweep job(s) failed:[/bold red]")
        for job_dir, message in _FAILED_JOBS:
            err_console.print(f"  {escape(job_dir)}: {escape(message)}")
        raise typer.Exit(1)


def _multiprocess_args(args: list[str]) -> list[str]:
    """In a multi-process launch every process composes the same run dir (see ``${rlkd_now:...}``);
    only rank 0 writes Hydra's ``.hydra/`` record."""
    from rlkd_cli.config import has_launcher_store, launch_rank, launch_world

    if launch_world() <= 1:
        return args
    if not has_launcher_store() and not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        raise RlkdError("this multi-process launch has no torchrun store to agree on a run dir; launch with "
                        "torchrun or accelerate launch, or pass hydra.run.dir=DIR (the same for every process)")
    return args + (["hydra.output_subdir=null"] if launch_rank() > 0 else [])


def _wrap_task(task: Callable) -> Callable:
    """Run the task; inside a multirun a failing job is recorded (failed.json) and the sweep goes on."""

    def job(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from rlkd_cli.config import launch_rank

        hc = HydraConfig.get()
        out_dir = Path(hc.runtime.output_dir)
        if launch_rank() > 0:  # the other processes of a multi-process launch: warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
        if hc.mode != RunMode.MULTIRUN:
            try:
                task(cfg, out_dir)
            except BaseException as ex:  # re-raised by run_hydra once Hydra has returned
                _PENDING.append(ex)
            return
        try:
            task(cfg, out_dir)
        except (Exception, SystemExit) as ex:  # record, keep sweeping
            from rlkd_cli.io import atomic_write_json

            message = str(ex) if isinstance(ex, RlkdError) else f"{type(ex).__name__}: {' '.join(str(ex).split())}"
            atomic_write_json(out_dir / "summary.json", {"command": cfg.get("command"), "status": "failed",
                                                         "error": message,
                                                         "overrides": list(hc.overrides.task)})
            log.error("job %s failed: %s", out_dir, message)
            _FAILED_JOBS.append((str(out_dir), message))

    job.__module__ = __name__
    return job


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------

def _sft_task(cfg, out_dir: Path) -> None:
    from rlkd_cli import engine

    engine.train(cfg, out_dir, mode="sft")


def _distill_task(cfg, out_dir: Path) -> None:
    from rlkd_cli import engine

    engine.train(cfg, out_dir, mode="distill")


def _cache_teacher_task(cfg, out_dir: Path) -> None:
    from rlkd_cli import teacher_cache

    teacher_cache.build(cfg, out_dir)


def _measure_task(cfg, out_dir: Path) -> None:
    from rlkd_cli import alignment

    alignment.run(cfg, out_dir)


def _evaluate_task(cfg, out_dir: Path) -> None:
    from rlkd_cli import evaluate

    evaluate.run(cfg, out_dir)


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def sft(ctx: typer.Context) -> None:
    """Fine-tune one model with cross-entropy (teachers, or the SFT baseline with model=student). --help for its config."""
    run_hydra("sft", _sft_task, list(ctx.args))


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def distill(ctx: typer.Context) -> None:
    """Distil the teacher into the student (default loss: kl+rank, the paper's mix). --help for its config."""
    run_hydra("distill", _distill_task, list(ctx.args))


@app.command("cache-teacher", context_settings=_PASS_THROUGH, add_help_option=False)
def cache_teacher(ctx: typer.Context) -> None:
    """Run the teacher once and store its top-K logits per response position (for distill teacher.cache=PATH)."""
    run_hydra("cache-teacher", _cache_teacher_task, list(ctx.args))


@app.command("measure-alignment", context_settings=_PASS_THROUGH, add_help_option=False)
def measure_alignment(ctx: typer.Context) -> None:
    """CR@k, OR@k, top-1 agreement and perplexities of checkpoints=[...] against the teacher. --help for its config."""
    run_hydra("measure-alignment", _measure_task, list(ctx.args))


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def evaluate(ctx: typer.Context) -> None:
    """Downstream metrics (accuracy, ROUGE-L, perplexity) of a model or checkpoints, or of a predictions file."""
    run_hydra("evaluate", _evaluate_task, list(ctx.args))


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="run or sweep folders (searched recursively for runs)"),
    out: Path = typer.Option(None, "--out", help="where report.md, report.csv and the plots go (default: the first PATH)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Tables and plots over runs and sweeps: mean ± std over seeds per swept setting, curves, by-modes split."""
    from rich.console import Console

    from rlkd_cli import report as report_mod

    try:
        console = Console(highlight=False, soft_wrap=False)
        if not console.is_terminal:  # logs and pipes: no 80-column squeeze
            console = Console(highlight=False, soft_wrap=False, width=200)
        report_mod.write_report(paths, out, console=console)
    except RlkdError as ex:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {escape(str(ex))}")
        raise typer.Exit(ex.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
