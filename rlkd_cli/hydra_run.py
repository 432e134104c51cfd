"""Running a command as a Hydra app: compose ``conf/<command>.yaml`` with the user's overrides, run the task
once or per sweep job, and turn every user error into one line.

Everything Hydra offers works as in any Hydra app: ``-m/--multirun`` sweeps, ``--cfg job``,
``--help``, ``hydra.run.dir=...``. Errors a user can fix are printed as one line starting with
``error:`` and exit 2; ``--debug`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from rlkd_cli.config import GROUPS, conf_dir, group_options
from rlkd_cli.errors import RlkdError
from rlkd_cli.io import DISK_FULL, disk_full

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("rlkd")

# Jobs of a multirun that failed (recorded by the task wrapper; the sweep goes on).
_FAILED_JOBS: list[tuple[str, str]] = []
# The exception of a failed single run, re-raised after Hydra returns (so Hydra prints nothing of its own).
_PENDING: list[BaseException] = []
#: Exit codes of a command stopped by a signal (checkpointed and resumable where it trains) -> the signal.
STOP_CODES = {143: "SIGTERM", 130: "SIGINT"}



def _check_group_choices(args: list[str]) -> None:
    """Unknown ``group=option`` values get one line listing the options (before Hydra composes)."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath", "+hydra.searchpath")) for a in args):
        return  # the user brings their own presets
    for arg in args:
        m = re.match(r"^~?\+{0,2}([A-Za-z_]+)=(.*)$", arg)
        if not m or m.group(1) not in GROUPS:
            continue
        group, value = m.group(1), m.group(2)
        choices = [v.strip() for v in re.sub(r"^(choice|glob)\((.*)\)$", r"\2", value).strip("[]").split(",")] \
            if not value.startswith(("glob(", "range(")) else []
        available = group_options(group)
        for choice in choices:
            if choice.lower() in ("null", "none", "") and group != "experiment" and not arg.startswith("~"):
                raise RlkdError(f"{group}={choice} leaves the command without a {group} config; pick one of "
                                f"{', '.join(available)}")
            if choice and choice not in available and choice.lower() not in ("null", "none"):
                raise RlkdError(f"unknown {group} '{choice}'; available: {', '.join(available)} "
                                f"(or add conf/{group}/{choice}.yaml)")


def _check_dash_options(command: str, args: list[str]) -> None:
    """``--max_steps 10`` (argparse style, which Hydra answers with its usage dump): one line with the
    ``key=value`` override to write instead, e.g. ``trainer.max_steps=10``."""
    from hydra._internal.utils import get_args_parser

    from rlkd_cli import schema

    _, unknown = get_args_parser().parse_known_args(args)
    for opt in (u for u in unknown if u.startswith("-")):
        name, eq, value = opt.lstrip("-").partition("=")
        if not eq:
            nxt = args[args.index(opt) + 1] if args.index(opt) + 1 < len(args) else ""
            value = nxt if nxt and "=" not in nxt and not nxt.startswith("-") else "VALUE"
        name = name.replace("-", "_")
        keys = sorted((k for k in schema.dotted_keys(command) if k == name or k.endswith("." + name)), key=len)
        example = f"{keys[0]}={value}" if keys else f"KEY={value}"
        raise RlkdError(f"'{opt}' is not an option of rlkd {command}: settings are key=value overrides, e.g. "
                        f"{example}; rlkd {command} --help lists the keys")


_TYPE_NAMES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _format_validation(ex, command: str) -> str | None:
    """OmegaConf's type errors at an override as ``KEY must be TYPE, got VALUE`` (None if not one)."""
    from rlkd_cli import schema

    msg = str(ex).strip().splitlines()[0]
    key = getattr(ex, "full_key", None)
    if not key:
        return None
    field = re.sub(r"\[\d+\]$", "", key)
    m = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m:
        words = schema.expected(command, field) or _TYPE_NAMES.get(m.group(3), m.group(3))
        return f"{field} must be {words}, got {m.group(1)!r}"
    m = re.match(r"Value '(.*)' is not a valid bool", msg)
    if m:
        return f"{field} must be true or false, got {m.group(1)!r}"
    m = re.match(r"Invalid value assigned: (\w+) is not a ListConfig, list or tuple", msg)
    if m:
        words = schema.expected(command, field) or "a list"
        return f"{field} must be {words}, e.g. {field}=[1,2,5]; got a single {m.group(1)}"
    if msg.startswith("Key '") and "not in" in msg:
        near = schema.nearest_key(command, key)
        return (f"unknown key {key}" + (f"; did you mean {near}?" if near else "")
                + " (check the keys with --cfg job)")
    return None


def format_hydra_error(ex: BaseException, command: str = "") -> str:
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    for inner in (ex, ex.__cause__):
        if isinstance(inner, OmegaConfBaseException) and _format_validation(inner, command):
            return _format_validation(inner, command)
    if isinstance(ex, MissingConfigException):
        opts = f"; available: {', '.join(ex.options)}" if getattr(ex, "options", None) else ""
        return f"{str(ex).strip().splitlines()[0]}{opts}"
    if isinstance(ex, OverrideParseException):
        return (f"cannot parse the override '{ex.override}': {ex.message.strip().splitlines()[0]}; quote a value "
                "with spaces or special characters, e.g. 'hydra.run.dir=\"my runs/a\"', and write key=value")
    if isinstance(ex, OmegaConfBaseException):
        key = getattr(ex, "full_key", None)
        return f"config error{f' at {key}' if key else ''}: {str(ex).strip().splitlines()[0]}"
    text = " ".join(str(ex).split())
    text = text.replace("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", "").strip()
    preset = _preset_error(text, command)
    if preset:
        return preset
    if "Could not override" in text or "Key '" in text:
        return text + " (check the key's spelling with --cfg job; add a new key with +key=value)"
    return text


def _preset_error(text: str, command: str) -> str | None:
    """A preset (``experiment=...``) that sets a group or key this command lacks: say so, not "check the spelling"."""
    m = re.match(r"^In '([\w+-]+)/([^']+)': (?:Could not override '([^']+)'\. No match in the defaults list"
                 r"|.*Key '([^']+)' not in '\w+')", text)
    if not m:
        return None
    group, option, what = m.group(1), m.group(2), m.group(3) or m.group(4)
    kind = "the config group" if m.group(3) else "the key"
    return (f"{group}={option} sets {kind} '{what}', which rlkd {command} does not have; drop it from that "
            f"preset ({group}/{option}.yaml), or use the preset with a command that has it")


def composition_error(ex: BaseException) -> BaseException:
    """What Hydra raised while composing, as the one-line error to show: Hydra's and OmegaConf's own errors
    as they are (formatted by :func:`format_hydra_error`), anything else (a ``ValueError`` from an override
    Hydra could not apply) as an :class:`RlkdError` naming the problem."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(ex, (RlkdError, HydraException, OmegaConfBaseException, OSError)):
        return ex
    return RlkdError(f"cannot compose the config from these overrides: {' '.join(str(ex).split())[:300]}; check "
                     "them with --cfg job")


def _print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}")


def error_message(ex: BaseException, command: str = "") -> tuple[str, int]:
    """The one-line message for ``ex`` (after ``error:``) and the exit code."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(ex, RlkdError):
        return str(ex), ex.exit_code
    if isinstance(ex, (HydraException, OmegaConfBaseException)):
        return format_hydra_error(ex, command), 2
    if disk_full(ex):
        where = f" '{ex.filename}'" if getattr(ex, "filename", None) else ""
        return DISK_FULL.format(where=where), 2
    if isinstance(ex, OSError):
        where = f" '{ex.filename}'" if getattr(ex, "filename", None) else ""
        return (f"{ex.strerror or ex}{where}; check the path and its permissions (the run dir is set with "
                "hydra.run.dir=..."), 2
    return (f"unexpected {type(ex).__name__}: {' '.join(str(ex).split())[:400]} (rerun with --debug for the "
            "traceback)"), 1


def _one_line(ex: BaseException, debug: bool, command: str = "") -> int:
    """Print ``ex`` as one ``error:`` line (after its traceback with ``--debug``); return the exit code
    (2 for a user error, with or without ``--debug``)."""
    if debug:
        import traceback

        traceback.print_exception(ex, file=sys.stderr)
    message, code = error_message(ex, command)
    _print_error(message)
    return code


def _log_to_file(message: str) -> None:
    """Write ``error: <message>`` to the run's log file (Hydra's file handler) only: the console gets the line
    from :func:`run_hydra`."""
    record = logging.LogRecord("rlkd", logging.ERROR, __file__, 0, "error: %s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_hydra(command: str, task: Callable, args: list[str]) -> None:
    """Compose ``conf/<command>.yaml`` with ``args`` and run ``task(cfg, run_dir)`` (once, or per sweep job)."""
    import hydra

    from rlkd_cli import schema

    debug = "--debug" in args or os.environ.get("HYDRA_FULL_ERROR") == "1"
    args = [a for a in args if a != "--debug"]
    _FAILED_JOBS.clear()
    _PENDING.clear()
    prev_argv, prev_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    prev_handlers = _stop_on_signals()
    try:
        _check_group_choices(args)
        _check_dash_options(command, args)
        args = _multiprocess_args(args)
        schema.register()
        sys.argv = [f"rlkd {command}", *args]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # we format errors ourselves
        try:
            hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")(_wrap_task(task))()
        except Exception as ex:  # noqa: BLE001 - the task's errors wait in _PENDING: this is composition
            error = composition_error(ex)
            if error is ex:
                raise
            raise error from ex
        if _PENDING:
            raise _PENDING.pop()
    except _Refused as ex:
        raise typer.Exit(_one_line(ex.error, debug, command))
    except SystemExit:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C in a training loop
        err_console.print("[red]interrupted: aborted at once (the steps since the last checkpoint are not saved; "
                          "trainer.resume=auto continues from it)[/red]")
        raise typer.Exit(130)
    except Exception as ex:  # noqa: BLE001 - every error ends as one line (or a traceback with --debug)
        raise typer.Exit(_one_line(ex, debug, command))
    finally:
        for sig, handler in prev_handlers.items():
            signal.signal(sig, handler)
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


def _stop_on_signals() -> dict:
    """Outside a training loop (which checkpoints first), SIGTERM ends the command with exit code 143, as a
    scheduler's pre-emption expects, and Ctrl-C (SIGINT) the same way with 130 (the wrapper says how to
    continue); returns the previous handlers (none off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise SystemExit(143 if signum == signal.SIGTERM else 130)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


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
    """Run the task; inside a multirun a failing job is recorded (summary.json) and the sweep goes on."""

    def job(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from rlkd_cli.config import launch_rank
        from rlkd_cli.engine import rundir

        hc = HydraConfig.get()
        out_dir = Path(hc.runtime.output_dir)
        if launch_rank() > 0:  # the other processes of a multi-process launch: warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
        command = str(cfg.get("command"))
        if launch_rank() == 0:
            log.info("rlkd %s: run dir %s", command, out_dir)
            rundir.point_latest(out_dir if hc.mode != RunMode.MULTIRUN else Path(str(hc.sweep.dir)))
        if hc.mode != RunMode.MULTIRUN:
            try:
                _say_where(command, out_dir, task(cfg, out_dir))
                rundir.forget(out_dir)
            except BaseException as ex:  # re-raised by run_hydra once Hydra has returned
                rundir.restore(out_dir)  # refused or failed before it was accepted: the earlier record stands
                if isinstance(ex, Exception):
                    _log_to_file(error_message(ex, command)[0])
                elif isinstance(ex, SystemExit) and ex.code in STOP_CODES:
                    log.warning("%s: rlkd %s stopped; continue with: rlkd %s %s hydra.run.dir=%s", STOP_CODES[ex.code],
                                command, command, RESUME_HINTS.get(command, "(rerun it)"), out_dir)
                _PENDING.append(ex)
            return
        try:
            _say_where(command, out_dir, task(cfg, out_dir))
            rundir.forget(out_dir)
        except SystemExit as ex:
            held = rundir.restore(out_dir)
            if ex.code in STOP_CODES:  # SIGTERM / SIGINT: the job is stopped (and resumable), and so is the sweep
                if not held and not (out_dir / "summary.json").exists():  # stopped before its training loop began
                    from rlkd_cli.io import atomic_write_json

                    atomic_write_json(out_dir / "summary.json", {
                        "command": cfg.get("command"), "status": "stopped", "reason": STOP_CODES[ex.code],
                        "resumable": True, "overrides": list(hc.overrides.task)})
                log.warning("%s: the sweep stops at job %s (resumable with trainer.resume=auto)", STOP_CODES[ex.code],
                            out_dir)
                raise
            _record_failure(cfg, hc, out_dir, ex, held=held)
        except Exception as ex:  # record, keep sweeping
            _record_failure(cfg, hc, out_dir, ex, held=rundir.restore(out_dir))

    job.__module__ = __name__
    return job


#: How each command continues an interrupted run in the same run dir.
RESUME_HINTS = {"distill": "trainer.resume=auto", "sft": "trainer.resume=auto", "generate": "resume=true",
                "cache-teacher": "<the same overrides> (its finished shards are kept)"}


def _say_where(command: str, out_dir: Path, result) -> None:
    """The end of a run: where its results are, and the commands that read them (with the real paths)."""
    from rlkd_cli.config import launch_rank

    if launch_rank() != 0 or not isinstance(result, dict):
        return
    lines = [f"rlkd {command} finished: {out_dir}"]
    for name in ("summary.json", "alignment.json", "results.json", f"{command}.log", "metrics.jsonl"):
        if (out_dir / name).is_file():
            lines.append(f"  {name:<16} {out_dir / name}")
    ckpt = result.get("checkpoint")
    if ckpt:
        lines += [f"  checkpoint       {ckpt}",
                  f"  next: rlkd measure-alignment checkpoints=[{ckpt}]",
                  f"        rlkd evaluate checkpoints=[{ckpt}]"]
    if result.get("cache"):
        lines.append(f"  next: rlkd distill teacher.cache={result['cache']}")
    for row in result.get("models") or []:
        lines.append(f"  generations      {row.get('file')}")
    lines.append(f"  next: rlkd report {out_dir}")
    log.info("\n".join(lines))


def _record_failure(cfg, hc, out_dir: Path, ex: BaseException, *, held: bool) -> None:
    """A sweep job that failed: ``summary.json`` with status ``failed`` and its error; the sweep goes on. A job
    refused in a dir that holds an earlier run (a resume sweep) leaves that run's record as it was: the error
    goes to the job's log and the sweep's last lines."""
    from rlkd_cli.io import atomic_write_json

    message = str(ex) if isinstance(ex, RlkdError) else f"{type(ex).__name__}: {' '.join(str(ex).split())}"
    if not held:
        atomic_write_json(out_dir / "summary.json", {"command": cfg.get("command"), "status": "failed",
                                                     "error": message, "overrides": list(hc.overrides.task)})
    log.error("job %s failed: %s", out_dir, message)
    _FAILED_JOBS.append((str(out_dir), message))


class _Refused(BaseException):
    """An RlkdError raised in a Hydra callback: Hydra turns a callback's ``Exception`` into a warning and goes
    on, so the refusal travels as a ``BaseException`` and :func:`run_hydra` prints it as one line."""

    def __init__(self, error: RlkdError):
        super().__init__(str(error))
        self.error = error


def _refuse_on_error(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RlkdError as e:
            raise _Refused(e) from None

    return wrapper


def _callback_base():
    from hydra.experimental.callback import Callback

    return Callback


class RunDirGuard(_callback_base()):
    """A Hydra callback (``hydra.callbacks`` in conf/common.yaml): claims the run dir before Hydra writes
    ``.hydra/`` into it, so a run refused for a busy or finished run dir changes nothing there
    (:func:`rlkd_cli.engine.rundir.claim`); a sweep refuses a sweep dir that already holds a sweep."""

    @_refuse_on_error
    def on_run_start(self, config, **kwargs) -> None:
        from rlkd_cli.config import launch_rank
        from rlkd_cli.engine import rundir

        if launch_rank() != 0:
            return
        if not str(config.hydra.run.dir).strip():
            raise RlkdError("hydra.run.dir is empty: it would write into the current directory; give a folder, "
                            "e.g. hydra.run.dir=outputs/my-run")
        run_dir = Path(str(config.hydra.run.dir))
        rundir.claim(run_dir, command=str(config.get("command")), resume=_continues(config, run_dir))
        rundir.protect(run_dir)  # Hydra rewrites .hydra/ next: kept until the run is accepted

    def on_run_end(self, config, **kwargs) -> None:
        from rlkd_cli.engine import rundir

        rundir.release(Path(str(config.hydra.run.dir)))

    @_refuse_on_error
    def on_multirun_start(self, config, **kwargs) -> None:
        if not str(config.hydra.sweep.dir).strip():
            raise RlkdError("hydra.sweep.dir is empty: give a folder, e.g. hydra.sweep.dir=outputs/my-sweep")
        sweep = Path(str(config.hydra.sweep.dir))
        if not (sweep / "multirun.yaml").exists():
            return
        if not (config.get("trainer") or {}).get("resume"):
            raise RlkdError(f"the sweep dir {sweep} already holds a sweep (multirun.yaml); continue its jobs with "
                            "trainer.resume=auto, or sweep into another dir with hydra.sweep.dir=... (nothing was "
                            "overwritten)")
        _check_same_sweep(sweep, list(config.hydra.overrides.task))
        from rlkd_cli.engine import rundir

        for hydra_dir in sweep.rglob(".hydra"):  # each earlier job's record, kept until its job is accepted
            rundir.protect(hydra_dir.parent)


    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir)).resolve()
        log.info("rlkd %s sweep finished: %s (one folder per job)\n  next: rlkd report %s", config.get("command"),
                 sweep, sweep)


def _check_same_sweep(sweep: Path, overrides: list[str]) -> None:
    """A resume sweep continues the sweep in ``sweep``: the same overrides in the same order (so job N is job N),
    but for the keys a resume may change; else each job would continue another job's run."""
    from omegaconf import OmegaConf

    from rlkd_cli.engine.checkpoint import RESUME_FREE_KEYS

    def kept(items) -> list[str]:
        keys = [re.sub(r"^[~+]+", "", str(o)).split("=", 1)[0] for o in items]
        return [str(o) for o, k in zip(items, keys)
                if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)]

    try:
        old = kept(OmegaConf.load(sweep / "multirun.yaml").hydra.overrides.task)
    except Exception:  # noqa: BLE001 - a damaged multirun.yaml: which sweep it was is unknown
        old = None
    new = kept(overrides)
    if old != new:
        was = " ".join(old) if old is not None else "its multirun.yaml cannot be read"
        raise RlkdError(f"the sweep dir {sweep} holds another sweep ({was}), not this one "
                        f"({' '.join(new) or 'no overrides'}); resume "
                        "a sweep with its own overrides in the same order (plus trainer.resume=auto), or sweep into "
                        "another dir with hydra.sweep.dir=... (nothing was overwritten)")


def _continues(config, run_dir: Path) -> bool:
    """Whether this run may write into a run dir that already holds one (see :mod:`rlkd_cli.engine.rundir`)."""
    from rlkd_cli.engine import rundir

    command = str(config.get("command"))
    if command in ("sft", "distill"):
        return bool((config.get("trainer") or {}).get("resume"))
    if command == "cache-teacher":  # an unfinished cache is finished by the same command in the same dir
        return set(rundir.holds_run(run_dir)) <= {"teacher_cache", "summary.json"}
    if command == "generate":
        return bool(config.get("resume"))
    return False


def command_task(module: str) -> Callable:
    """The task of a command module: ``rlkd_cli.commands.<module>.run(cfg, run_dir)``, imported when it runs."""

    def task(cfg, run_dir: Path):
        return importlib.import_module(f"rlkd_cli.commands.{module}").run(cfg, run_dir)

    return task
