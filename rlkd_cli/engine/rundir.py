"""A run dir is one run's: claimed with a lock, never silently reused, its summary never stale.

* **One run at a time.** :func:`claim` takes an exclusive lock on ``<run dir>/.rlkd.lock`` (the
  operating system's, released when the process ends, however it ends); a second run in the same
  dir stops with one line naming the process that holds it.
* **A finished run's data is never destroyed.** A run dir that already holds a run (metrics,
  checkpoints, a summary, results) is refused unless the new run continues it
  (``trainer.resume=auto`` or a checkpoint path); choose another ``hydra.run.dir`` instead. Hydra's
  own files (``.hydra/``, ``<command>.log``) do not count.
* **A refused run changes nothing.** Every check that can refuse a continued run (a changed config,
  other data, a changed schedule) runs before the dir is written: the previous ``summary.json`` is
  removed only once the run is accepted (:func:`accept`), and Hydra's ``.hydra/`` record, which
  Hydra rewrites before the task starts, is kept aside (:func:`protect`) and put back
  (:func:`restore`) when the run ends without being accepted.
* **No stale summary.** An accepted continued run removes the previous ``summary.json`` before it
  trains: the dir never shows an earlier invocation's "completed" or "stopped" beside newer weights.

The CLI claims the run dir before Hydra writes ``.hydra/`` (a Hydra callback), so a refused run
leaves the old record untouched; the engine claims it again when called from Python (a no-op for
a dir this process already holds).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from rlkd_cli.errors import RlkdError
from rlkd_cli.io import ensure_writable_dir

log = logging.getLogger("rlkd.engine")

LOCK = ".rlkd.lock"
OWNER = ".rlkd-owner.json"
#: Files and folders that mean "a run already wrote here".
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints", "results.json", "alignment.json", "predictions.jsonl",
               "teacher_cache", "generations.jsonl", "generations")

_CLAIMED: dict[str, object] = {}  # run dirs this process holds -> their lock
_KEPT: dict[str, dict[str, bytes]] = {}  # run dirs that held a run -> their .hydra/ files before this invocation


def holds_run(path: Path) -> list[str]:
    """The markers of an earlier run in ``path`` (empty for a fresh dir)."""
    return [m for m in RUN_MARKERS if (Path(path) / m).exists()]


def _owner(path: Path) -> str:
    try:
        info = json.loads((path / OWNER).read_text())
        return f"process {info.get('pid')} on {info.get('host')} (rlkd {info.get('command', '?')})"
    except (OSError, ValueError, AttributeError):
        return "another process"


def claim(path: str | os.PathLike, *, command: str, resume: bool) -> Path:
    """Lock ``path`` for this run and refuse a dir that holds another run (see the module docstring)."""
    from filelock import FileLock, Timeout

    path = ensure_writable_dir(path)
    key = str(path.resolve())
    if key in _CLAIMED:
        return path
    lock = FileLock(str(path / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RlkdError(f"the run dir {path} is in use by {_owner(path)}; wait for it to finish, or run in another "
                        "dir with hydra.run.dir=...") from None
    markers = holds_run(path)
    if markers and not resume:
        lock.release()
        raise RlkdError(f"the run dir {path} already holds a run ({', '.join(markers)}); continue it with "
                        "trainer.resume=auto, or start the new run in another dir with hydra.run.dir=... (nothing "
                        "was overwritten)")
    (path / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}))
    _CLAIMED[key] = lock
    return path


def protect(path: str | os.PathLike) -> None:
    """Keep the ``.hydra/`` record of a dir that holds a run, before Hydra rewrites it (see :func:`restore`)."""
    path = Path(path)
    if not holds_run(path) or str(path.resolve()) in _KEPT:
        return
    hydra_dir = path / ".hydra"
    files = {p.name: p.read_bytes() for p in hydra_dir.iterdir() if p.is_file()} if hydra_dir.is_dir() else {}
    _KEPT[str(path.resolve())] = files


def protected(path: str | os.PathLike) -> bool:
    """Whether ``path`` held a run whose record this invocation has not (yet) been allowed to change."""
    return str(Path(path).resolve()) in _KEPT


def accept(path: str | os.PathLike) -> None:
    """The run passed every check and continues the run in ``path``: its record may change from here on.

    The previous ``summary.json`` is removed (it describes an earlier invocation).
    """
    path = Path(path)
    _KEPT.pop(str(path.resolve()), None)
    if (path / "summary.json").exists():
        (path / "summary.json").unlink()
        log.info("removed the previous summary.json of %s (this run continues it)", path)


def forget(path: str | os.PathLike) -> None:
    """The command succeeded on ``path``: Hydra's new record stands."""
    _KEPT.pop(str(Path(path).resolve()), None)


def restore(path: str | os.PathLike) -> bool:
    """Put back the ``.hydra/`` record :func:`protect` kept, unless the run was accepted; True if it did."""
    from rlkd_cli.io import atomic_write_bytes

    files = _KEPT.pop(str(Path(path).resolve()), None)
    if files is None:
        return False
    hydra_dir = Path(path) / ".hydra"
    if hydra_dir.is_dir():
        for extra in hydra_dir.iterdir():
            if extra.is_file() and extra.name not in files:
                extra.unlink()
    for name, data in files.items():
        atomic_write_bytes(hydra_dir / name, data)
    return True


def point_latest(path: str | os.PathLike) -> Path | None:
    """Point ``<parent>/latest`` at the run (or sweep) dir ``path`` (a relative symlink, replaced in one rename),
    so the newest run of a command is ``outputs/<command>/latest``; a ``latest`` that is not a link is left alone."""
    path = Path(path).resolve()
    link = path.parent / "latest"
    if link.exists() and not link.is_symlink():
        log.debug("not pointing %s at %s: it is not a link", link, path)
        return None
    tmp = path.parent / f".tmp-latest-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:  # a file system without links: the run itself is unaffected
        log.debug("cannot point %s at %s: %s", link, path, e)
        tmp.unlink(missing_ok=True)
        return None
    return link


def release(path: str | os.PathLike) -> None:
    """Give up the lock of a run dir this process holds (no-op otherwise)."""
    lock = _CLAIMED.pop(str(Path(path).resolve()), None)
    if lock is not None:
        (Path(path) / OWNER).unlink(missing_ok=True)
        lock.release()


def trim_metrics(path: Path, step: int) -> None:
    """Keep the ``metrics.jsonl`` records logged at or before ``step`` (a resumed run logs the rest again)."""
    import math

    from rlkd_cli.io import atomic_write_text

    metrics = Path(path) / "metrics.jsonl"
    if not metrics.exists():
        return

    def logged_step(line: str) -> float:
        try:
            return float(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return math.inf  # a blank or torn line (a kill mid-write): dropped

    kept = [line for line in metrics.read_text(encoding="utf-8", errors="replace").split("\n")
            if line.strip() and logged_step(line) <= step]
    atomic_write_text(metrics, "".join(line + "\n" for line in kept))
