"""Small file-system helpers: atomic folders and files, an inter-process lock, JSON lines.

Everything rlkd writes that another process may read (checkpoints, the cached tiny teacher, the
embedded tokenizer, summaries) is written to a temporary sibling first and renamed into place, so a
reader sees either the old complete thing or the new complete thing, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rlkd_cli.errors import RlkdError


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_allows(path: Path, directory: bool) -> None:
    """``tempfile`` creates 0600 files and 0700 folders; give them the mode an ordinary open would (the umask's)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success rename it to ``target``.

    An existing ``target`` is replaced (moved aside, then deleted after the rename). On an
    exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    _as_umask_allows(tmp, directory=True)
    try:
        yield tmp
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make the finished folder ``tmp`` appear as ``target`` in one rename (an old ``target`` is replaced).

    ``tmp`` must be a sibling named ``.tmp-*`` so that an interrupted publish is recognisable.
    """
    tmp, target = Path(tmp), Path(target)
    _fsync_tree(tmp, mode=True)
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        _as_umask_allows(Path(tmp), directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None, so the JSON written is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` (``allow_nan=False``: a stray NaN is a bug, not output)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (``filelock.FileLock``; created if missing), released on exit.

    Used so that concurrent sweep jobs train or build a cached artefact only once. The lock is the
    operating system's (``flock``): a process that dies releases it, so a stale lock file is harmless.
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def ensure_writable_dir(path: str | os.PathLike, what: str = "output dir") -> Path:
    """Create ``path`` if needed and check that a file can be written there; RlkdError if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as e:
        hint = {"output dir": " with hydra.run.dir=...", "report folder (--out)": " with --out DIR"}.get(what, "")
        raise RlkdError(f"cannot write to the {what} '{path}' ({e.strerror or e}); choose a writable location{hint}") from e
    return path


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of JSON Lines text, per the format: lines end at ``\\n`` only.

    ``str.splitlines`` would also split at U+2028, U+0085, form feeds and the like, which JSON
    strings may hold unescaped (real GSM8K rows do). A leading UTF-8 byte-order mark is dropped and
    a ``\\r`` before the ``\\n`` is not part of the line.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    for lineno, line in enumerate(text.split("\n"), 1):
        yield lineno, line[:-1] if line.endswith("\r") else line


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON Lines file (:func:`jsonl_lines`); a malformed line is an RlkdError naming its line number."""
    rows = []
    text = Path(path).read_text(encoding="utf-8-sig")
    for lineno, line in jsonl_lines(text):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RlkdError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix or remove that line") from e
    return rows


def _fsync_tree(root: Path, mode: bool = False) -> None:
    """fsync every file below ``root``; with ``mode``, also give files and folders the umask's mode (some writers,
    such as safetensors and ``tempfile``, create them 0600 / 0700 whatever the umask)."""
    if mode:
        _as_umask_allows(root, directory=True)
    for dirpath, dirnames, filenames in os.walk(root):
        if mode:
            for name in dirnames:
                _as_umask_allows(Path(dirpath) / name, directory=True)
            for name in filenames:
                _as_umask_allows(Path(dirpath) / name, directory=False)
        for name in filenames:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__


DISK_FULL = ("the disk is full (no space left on device) while writing{where}; free some space, lower "
             "trainer.keep_last, or put the run on a disk with room (hydra.run.dir=..., RLKD_CACHE_DIR=...), "
             "then continue with trainer.resume=auto")
#: A write that fails with less free space than this on its disk is taken for a full disk.
LOW_SPACE_BYTES = 64 * 2**20


def disk_full(ex: BaseException | None) -> bool:
    """True for an out-of-space error: errno ENOSPC/EDQUOT anywhere in the exception's chain, or a library's
    message saying so (safetensors: "No space left on device (os error 28)")."""
    import errno

    seen: set[int] = set()
    while ex is not None and id(ex) not in seen:
        seen.add(id(ex))
        if isinstance(ex, OSError) and ex.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if any(s in str(ex) for s in ("No space left on device", "Disk quota exceeded", "os error 28", "StorageFull")):
            return True
        ex = ex.__cause__ or ex.__context__
    return False


def low_space(path: str | os.PathLike) -> bool:
    """Whether the disk holding ``path`` (or its nearest existing parent) has almost no room left."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < LOW_SPACE_BYTES
    except OSError:
        return False


def write_error(ex: BaseException, path: str | os.PathLike) -> RlkdError | None:
    """The one-line error for a write to ``path`` that failed because the disk is full, else ``None``.

    ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc...]``
    with no errno, so a failed write on a disk with (almost) no room left counts as one too.
    """
    if isinstance(ex, RlkdError):
        return None
    if disk_full(ex) or (isinstance(ex, (OSError, RuntimeError)) and low_space(path)):
        return RlkdError(DISK_FULL.format(where=f" '{path}'"))
    return None
