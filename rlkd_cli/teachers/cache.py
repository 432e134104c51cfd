r"""``rlkd cache-teacher``: run the teacher once over a dataset and keep its top-K logits per response position.

``rlkd distill teacher.cache=PATH`` then trains from the cache with no teacher forward at all: the
teacher's distribution at each response position is a :class:`~rlkd_cli.losses.TopKLogits` (its K
largest logits and ids, the log-normaliser and the log of the mass outside the K ids, per
temperature), and every loss reads it as described there (divergences on the K cached ids plus one
tail bin, a lower bound of the exact f-divergence; the ranking loss on cached values).

Layout of a cache folder::

    cache.json                      what it holds and how it was made (format, K, temperatures, dtype,
                                    teacher, tokenizer and split fingerprints, shards, status)
    <split>/shard-000000.safetensors
        ids            int32   [P, K]   top-K token ids by decreasing logit
        logits         dtype   [P, K]   their raw logits (cache.dtype: float32, bfloat16 or float16)
        log_normalizer float32 [P, T]   logsumexp of logits / temperature over the whole vocabulary
        tail_log_mass  float32 [P, T]   log of the probability outside the K ids
        offsets        int64   [E+1]    rows offsets[j]:offsets[j+1] belong to the shard's j-th example

A shard holds ``cache.shard_examples`` consecutive examples of the split (``P`` = their response
positions, in order). Shards are written to a temporary file and renamed, so an interrupted run
leaves only complete shards; running the same command again (same ``cache.out``) skips them and
finishes the rest. ``cache.json`` says ``"status": "complete"`` only when every shard is there,
and distillation refuses anything else. Reads are memory-mapped slices (safetensors), so a cache
far larger than RAM works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlkd_cli.data import dataset as data_mod
from rlkd_cli.data.loader import IndexedRows, pad_id
from rlkd_cli.data.tokenizer import fingerprint as tokenizer_fingerprint
from rlkd_cli.engine import chunking
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import atomic_write_json, current_umask, ensure_writable_dir, file_lock
from rlkd_cli.losses import Objective, TopKLogits, cross_entropy, ranking_loss
from rlkd_cli.teachers.live import LiveTeacher

log = logging.getLogger("rlkd.cache")

FORMAT = 2
META = "cache.json"
OPEN_SHARDS = 256  # shard files kept open (memory-mapped) at once while distilling
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------------------------
# Fingerprints: what a cache must agree with
# ----------------------------------------------------------------------------------------------

def teacher_signature(path: str) -> str:
    """A hash of a model folder's contents, cheap for any size: config.json, and of each safetensors
    file its header (tensor names, shapes, offsets), size, and first and last MiB of weights.
    A hub id that is not a local folder is identified by its name."""
    folder = Path(os.path.expanduser(path))
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(str(path).encode())
        return h.hexdigest()[:16]
    for f in sorted(folder.glob("config.json")) + sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            if f.suffix != ".safetensors":
                h.update(fh.read())
                continue
            size = f.stat().st_size
            h.update(str(size).encode())
            header = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header, 1 << 24)))
            fh.seek(8 + header)
            h.update(fh.read(1 << 20))
            fh.seek(max(8 + header, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def loss_temperatures(objective: Objective) -> list[float]:
    """The temperatures at which the objective's divergence terms read the teacher's distribution."""
    out = []
    for _, fn, _, options in objective.active_terms:
        if fn is cross_entropy or fn is ranking_loss:
            continue
        out.append(float(options.get("temperature", 1.0)))
    return out


# ----------------------------------------------------------------------------------------------
# Reading a cache
# ----------------------------------------------------------------------------------------------

class TeacherCache:
    """A finished teacher cache, read by the engine in place of a live teacher (``rows`` per micro-batch)."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root, self.meta = root, meta
        self.k = int(meta["top_k"])
        self.temperatures = tuple(float(t) for t in meta["temperatures"])
        self.shard_examples = int(meta["shard_examples"])
        self._handles: OrderedDict[tuple[str, int], tuple[Any, torch.Tensor]] = OrderedDict()

    # -- opening and checks ------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, tokenizer=None, teacher_cfg: Any = None) -> "TeacherCache":
        """A finished cache, checked against the run's tokenizer and, when ``teacher.name_or_path`` is set,
        against that teacher (its signature must be the cache's)."""
        root = Path(os.path.expanduser(str(path)))
        require(root.is_dir(), f"teacher.cache '{path}' is not a folder; build one with rlkd cache-teacher "
                               "cache.out=PATH (same dataset and teacher settings as the distill run)")
        meta_path = root / META
        require(meta_path.is_file(), f"teacher.cache '{path}' is not a teacher cache (no {META}); build one with "
                                     "rlkd cache-teacher cache.out=PATH")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise RlkdError(f"teacher cache {meta_path} cannot be read ({e}); rebuild it with rlkd cache-teacher") from e
        require(int(meta.get("format", 0)) == FORMAT,
                f"teacher cache '{path}' has format {meta.get('format')}, this rlkd reads format {FORMAT}; "
                "rebuild it with this version's rlkd cache-teacher")
        if meta.get("status") != "complete":
            done, total = _shards_on_disk(root, meta)
            raise RlkdError(f"teacher cache '{path}' is incomplete ({done}/{total} shards); finish it by running the "
                            f"same rlkd cache-teacher command again with cache.out={path} (it keeps the {done} "
                            "finished shards)")
        _check_shards(root, meta)
        cache = cls(root, meta)
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != meta.get("tokenizer"):
            raise RlkdError(f"teacher cache '{path}' was built with another tokenizer ({meta.get('tokenizer_name')}); "
                            "distil with the tokenizer of the cache's teacher, or rebuild the cache")
        named = teacher_cfg.get("name_or_path") if teacher_cfg is not None else None
        if named and teacher_signature(str(named)) != meta.get("teacher_signature"):
            raise RlkdError(f"teacher cache '{path}' was built from teacher {meta.get('teacher')}, not "
                            f"teacher.name_or_path={named} (their signatures differ); drop teacher.name_or_path to "
                            "distil from the cache, or rebuild the cache with this teacher (rlkd cache-teacher)")
        return cache

    def describe(self) -> str:
        return f"cache:{self.root} (teacher {self.meta.get('teacher')}, K={self.k})"

    def check_objective(self, objective: Objective, ks: list[int]) -> None:
        """The cache must hold enough logits (K) and every temperature the loss reads the teacher at."""
        for key, fn, _, options in objective.active_terms:
            k = int(options.get("k", 5))
            if fn is ranking_loss and k > self.k:
                raise RlkdError(f"loss term {key!r} has k={k} but teacher cache {self.root} keeps "
                                f"K={self.k} logits per position; lower the k or rebuild with cache.top_k>={k}")
        for t in loss_temperatures(objective):
            if not any(abs(t - c) <= 1e-6 * max(1.0, abs(c)) for c in self.temperatures):
                raise RlkdError(f"the loss reads the teacher at temperature {t:g} but teacher cache {self.root} has "
                                f"log-normalisers for {', '.join(f'{c:g}' for c in self.temperatures)} only; rebuild "
                                f"it with cache.temperatures=[{t:g}]")
        if max(ks) > self.k:
            raise RlkdError(f"metrics.ks asks for CR/OR@{max(ks)} but teacher cache {self.root} keeps K={self.k} "
                            f"logits per position; use metrics.ks with k <= {self.k}")

    def check(self, objective: Objective, ks: list[int], splits: dict[str, Any]) -> None:
        """The engine's check of a teacher source: K and temperatures cover the loss, the splits are the cache's."""
        self.check_objective(objective, ks)
        self.check_splits(splits)

    def check_splits(self, splits: dict[str, Any]) -> None:
        """Each tokenized split used with the cache must be the one it was built from (same examples, in order)."""
        for name, split in splits.items():
            info = self.meta["splits"].get(name)
            if info is None:
                raise RlkdError(f"teacher cache {self.root} has no '{name}' split (it has "
                                f"{', '.join(self.meta['splits'])}); rebuild it with cache.splits=[train,validation]")
            fp = split.fingerprint
            if fp != info["fingerprint"]:
                raise RlkdError(
                    f"teacher cache {self.root} was built from another '{name}' split ({info['num_examples']} examples, "
                    f"fingerprint {info['fingerprint']}; this run has {len(split.dataset)}, {fp}); use the dataset.*, "
                    f"tokenizer and trainer.eval_examples settings it was built with (see {self.root / META}), or "
                    "rebuild it with rlkd cache-teacher and this run's overrides")

    # -- reading rows -------------------------------------------------------------------------

    def _shard(self, split: str, index: int):
        """The open (memory-mapped) shard and its offsets; at most :data:`OPEN_SHARDS` stay open."""
        key = (split, index)
        if key in self._handles:
            self._handles.move_to_end(key)
            return self._handles[key]
        from safetensors import safe_open

        path = self.root / split / shard_name(index)
        try:
            handle = safe_open(str(path), framework="pt")
            offsets = handle.get_tensor("offsets")
            identity = (handle.metadata() or {}).get("identity", "")
        except Exception as e:  # a missing or damaged shard file
            raise RlkdError(f"teacher cache shard {path} cannot be read ({e}); rebuild the cache (rlkd "
                            "cache-teacher) or restore the file") from e
        if identity != expected_identity(self.meta, split):
            raise _foreign_shard(path, self.root)
        self._handles[key] = (handle, offsets)
        if len(self._handles) > OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle, offsets

    def example_rows(self, split: str, examples: list[int]) -> TopKLogits:
        """The cached rows of ``examples`` (indices into the split), concatenated in the given order."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("ids", "logits", "log_normalizer", "tail_log_mass")}
        for i in examples:
            handle, offsets = self._shard(split, i // self.shard_examples)
            j = i % self.shard_examples
            a, b = int(offsets[j]), int(offsets[j + 1])
            for name, chunks in parts.items():
                chunks.append(handle.get_slice(name)[a:b])
        cat = {n: torch.cat(c) if c else torch.empty(0) for n, c in parts.items()}
        return TopKLogits(cat["ids"], cat["logits"], cat["log_normalizer"], cat["tail_log_mass"], self.temperatures)

    def rows(self, batch: dict[str, torch.Tensor], idx: torch.Tensor, split: str = "train") -> TopKLogits:
        """The teacher rows of a micro-batch's scored positions (the engine's teacher interface)."""
        examples = [int(i) for i in batch["example_ids"].tolist()]
        rows = self.example_rows(split, examples)
        require(rows.ids.shape[0] == idx.numel(),
                f"teacher cache {self.root} holds {rows.ids.shape[0]} positions for examples {examples[:4]}... of "
                f"the {split} split but the batch scores {idx.numel()}; the cache does not belong to this dataset")
        return rows.to(idx.device)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


#: The keys of cache.json that a shard's identity hashes (what :func:`build` calls the cache's identity).
IDENTITY_KEYS = ("format", "top_k", "dtype", "temperatures", "shard_examples", "teacher_signature", "tokenizer",
                 "vocab_size")


def expected_identity(meta: dict[str, Any], split: str) -> str:
    """The identity every shard of ``split`` must carry in a cache described by ``meta`` (its cache.json)."""
    info = meta.get("splits", {}).get(split, {})
    return shard_identity({k: meta.get(k) for k in IDENTITY_KEYS}, split, str(info.get("fingerprint")))


def _foreign_shard(path: Path, root: Path) -> RlkdError:
    return RlkdError(f"teacher cache shard {path} was written by another teacher, tokenizer, data set or cache "
                     f"settings than {root / META} describes (its identity differs); rebuild that cache folder with "
                     "rlkd cache-teacher, or put the shard back in the cache it came from")


def _check_shards(root: Path, meta: dict[str, Any]) -> None:
    """Every shard of a complete cache carries the identity its cache.json implies (headers only: cheap), so a
    folder mixing two teachers' shards is refused before training, not read as one teacher."""
    from safetensors import safe_open

    for split, info in meta.get("splits", {}).items():
        ident = expected_identity(meta, split)
        for i in range(int(info.get("num_shards", 0))):
            path = root / split / shard_name(i)
            try:
                with safe_open(str(path), framework="pt") as f:
                    found = (f.metadata() or {}).get("identity", "")
            except Exception as e:  # a missing or damaged shard file
                raise RlkdError(f"teacher cache shard {path} cannot be read ({e}); rebuild the cache (rlkd "
                                "cache-teacher) or restore the file") from e
            if found != ident:
                raise _foreign_shard(path, root)


def _shards_on_disk(root: Path, meta: dict[str, Any]) -> tuple[int, int]:
    """``(complete shards of this cache on disk, shards it needs)``: counted from the files, since a killed
    build may have renamed shards into place after cache.json was last written."""
    done = total = 0
    per = int(meta.get("shard_examples", 0) or 0)
    for split, info in meta.get("splits", {}).items():
        n, shards = int(info.get("num_examples", 0)), int(info.get("num_shards", 0))
        total += shards
        ident = expected_identity(meta, split)
        done += sum(_shard_complete(root / split / shard_name(i), min(per, n - i * per), ident)
                    for i in range(shards)) if per else len(info.get("shards_done", []))
    return done, total


# ----------------------------------------------------------------------------------------------
# Building a cache: rlkd cache-teacher
# ----------------------------------------------------------------------------------------------

def validate_cache_cfg(cc: Any) -> dict[str, Any]:
    """The ``cache`` block as plain values, checked against :class:`rlkd_cli.schema.CacheConfig`."""
    from rlkd_cli import schema

    schema.check(cc, schema.CacheConfig, "cache")
    plain = OmegaConf.to_container(cc, resolve=True) if OmegaConf.is_config(cc) else dict(cc)
    out = {**{f: getattr(schema.CacheConfig(), f) for f in schema.CacheConfig.__dataclass_fields__}, **plain}
    out["temperatures"] = [float(t) for t in out["temperatures"]]
    return out


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600 whatever the umask
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_identity(identity: dict[str, Any], split: str, fingerprint: str) -> str:
    """What a shard must have been written with to be reused: the cache's settings, teacher, tokenizer and data."""
    blob = json.dumps({"identity": identity, "split": split, "fingerprint": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _shard_complete(path: Path, n_examples: int, identity: str = "") -> bool:
    """A shard file of ``n_examples`` examples written with ``identity`` (its metadata says so); anything else,
    a shard of another teacher or other data included, is rewritten. cache.json is not needed to tell."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            same = (f.metadata() or {}).get("identity", "") == identity
            return same and tuple(f.get_slice("offsets").get_shape()) == (n_examples + 1,)
    except Exception:
        return False


@torch.no_grad()
def cache_split(teacher: LiveTeacher, ds, *, out: Path, split: str, opts: dict[str, Any],
                temperatures: tuple[float, ...], chunk: int, pad_token_id: int, runtime, on_shard=None) -> dict[str, Any]:
    """Write the shards of one split (skipping complete ones); return its entry for cache.json."""
    from rlkd_cli.data.loader import Collator

    collator, rows_of = Collator(pad_token_id), IndexedRows(ds)
    device = runtime.device
    n = len(ds)
    per = opts["shard_examples"]
    n_shards = (n + per - 1) // per
    done, positions = [], 0
    for s in range(n_shards):
        lo, hi = s * per, min((s + 1) * per, n)
        path = out / split / shard_name(s)
        if _shard_complete(path, hi - lo, opts.get("identity", "")):
            done.append(s)
            if on_shard:
                on_shard(split, s, n_shards, skipped=True)
            continue
        parts: dict[str, list[torch.Tensor]] = {n_: [] for n_ in ("ids", "logits", "log_normalizer", "tail_log_mass")}
        counts: list[int] = []
        for b in range(lo, hi, opts["batch_size"]):
            ids = list(range(b, min(b + opts["batch_size"], hi)))
            batch = {k: v.to(device) for k, v in collator(rows_of.__getitems__(ids)).items()}
            idx, _ = chunking.response_index(batch["labels"])
            keep = batch["labels"][:, 1:] != -100
            counts += keep.sum(-1).tolist()
            with runtime.autocast():
                rows = teacher.rows(batch, idx)
                for sl in chunking.chunk_slices(len(rows), chunk):
                    top = TopKLogits.from_logits(rows[sl], opts["top_k"], temperatures)
                    parts["ids"].append(top.ids.to(torch.int32).cpu())
                    parts["logits"].append(top.logits.to(DTYPES[opts["dtype"]]).cpu())
                    parts["log_normalizer"].append(top.log_normalizer.float().cpu())
                    parts["tail_log_mass"].append(top.tail_log_mass.float().cpu())
        tensors = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
        k_eff = min(opts["top_k"], teacher.vocab)
        if not parts["ids"]:  # a shard of examples with no response position
            tensors = {"ids": torch.empty(0, k_eff, dtype=torch.int32),
                       "logits": torch.empty(0, k_eff, dtype=DTYPES[opts["dtype"]]),
                       "log_normalizer": torch.empty(0, len(temperatures)),
                       "tail_log_mass": torch.empty(0, len(temperatures))}
        tensors["offsets"] = torch.tensor([0] + np.cumsum(counts).tolist(), dtype=torch.int64)
        _save_shard(path, tensors, {"split": split, "first_example": str(lo), "examples": str(hi - lo),
                                    "identity": opts.get("identity", "")})
        positions += int(tensors["ids"].shape[0])
        done.append(s)
        if on_shard:
            on_shard(split, s, n_shards, skipped=False)
    return {"num_examples": n, "num_shards": n_shards, "shards_done": done}


def plan(cfg: DictConfig) -> tuple[dict[str, Any], tuple[float, ...]]:
    """The checked ``cache.*`` options and the temperatures to keep; everything is checked before anything is written."""
    opts = validate_cache_cfg(cfg.cache)
    ks = sorted(set(int(k) for k in cfg.metrics.ks))
    objective = Objective.from_config(cfg.loss)
    temperatures = tuple(sorted({1.0, *loss_temperatures(objective), *opts["temperatures"]}))
    for key, fn, _, options in objective.active_terms:
        if fn is ranking_loss and int(options.get("k", 5)) > opts["top_k"]:
            raise RlkdError(f"loss term {key!r} ranks the top-{options.get('k', 5)} but cache.top_k={opts['top_k']}; "
                            f"raise cache.top_k to at least {options.get('k', 5)}")
    require(max(ks) <= opts["top_k"], f"metrics.ks goes up to {max(ks)} but cache.top_k={opts['top_k']}; "
                                      f"raise cache.top_k or lower metrics.ks")
    return opts, temperatures


def _open_meta(target: Path, identity: dict[str, Any], split_ids: dict[str, dict], base: dict[str, Any],
               shard_examples: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``(meta, old meta, shards missing)`` of the cache folder; refuses a folder built with other settings."""
    meta_path = target / META
    for leftover in target.glob("*/.tmp-shard-*"):  # writes killed before their rename
        leftover.unlink(missing_ok=True)
    old: dict[str, Any] = {}
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        changed = [k for k, v in identity.items() if old.get(k) != v] + [
            f"splits.{n}" for n, v in split_ids.items()
            if n in old.get("splits", {}) and old["splits"][n].get("fingerprint") != v["fingerprint"]]
        if changed:
            raise RlkdError(f"{target} holds a teacher cache built with other settings ({', '.join(changed[:5])} "
                            "differ); choose another cache.out, or delete that folder to rebuild it")
    per = shard_examples
    if not old and any(target.glob("*/shard-*.safetensors")):
        log.warning("%s has shards but no readable %s: each shard is checked against this run's teacher, tokenizer, "
                    "data and settings, and the others are rewritten", target, META)
    missing = [(n, i) for n, v in split_ids.items() for i in range(-(-v["num_examples"] // per))
               if not _shard_complete(target / n / shard_name(i), min(per, v["num_examples"] - i * per),
                                      shard_identity(identity, n, v["fingerprint"]))]
    new_entries = {n: {**v, "num_shards": -(-v["num_examples"] // per),
                       "shards_done": [i for i in range(-(-v["num_examples"] // per)) if (n, i) not in missing]}
                   for n, v in split_ids.items()}
    # splits cached by an earlier run and not asked for now are kept as they are
    meta = {**identity, "status": "incomplete", **base, "splits": {**old.get("splits", {}), **new_entries}}
    if old.get("status") == "complete" and not missing:
        log.info("the teacher cache in %s is already complete for %s; nothing to do", target, ", ".join(split_ids))
        meta["status"] = "complete"
    elif old:
        log.info("resuming the teacher cache in %s (%d shard(s) to write)", target, len(missing))
    return meta, old, len(missing)


def _write(teacher: LiveTeacher, splits: dict[str, Any], target: Path, meta: dict[str, Any], old: dict[str, Any],
           opts: dict[str, Any], temperatures: tuple[float, ...], chunk: int, pad: int, runtime,
           identity: dict[str, Any]) -> dict[str, int]:
    """Write every missing shard, keeping cache.json up to date; ``{"new": n, "skipped": m}``."""
    meta_path = target / META
    if meta["status"] != "complete" or meta != old:
        atomic_write_json(meta_path, meta)
    written = {"new": 0, "skipped": 0}

    def on_shard(split: str, s: int, total: int, skipped: bool) -> None:
        written["skipped" if skipped else "new"] += 1
        if not skipped:
            log.info("%s shard %d/%d written", split, s + 1, total)

    for name, split in splits.items():
        split_opts = {**opts, "identity": shard_identity(identity, name, split.fingerprint)}
        entry = cache_split(teacher, split.dataset, out=target, split=name, opts=split_opts, temperatures=temperatures,
                            chunk=chunk, pad_token_id=pad, runtime=runtime, on_shard=on_shard)
        meta["splits"][name].update(entry)
        if meta["status"] != "complete":
            atomic_write_json(meta_path, meta)
    if meta["status"] != "complete":
        meta["status"] = "complete"
        atomic_write_json(meta_path, meta)
    return written


def build(cfg: DictConfig, out_dir: Path, *, runtime, tokenizer) -> dict[str, Any]:
    """``rlkd cache-teacher``: run the teacher over the splits, write the cache (see the module docstring)."""
    from rlkd_cli import models
    from rlkd_cli.teachers import live

    opts, temperatures = plan(cfg)
    out_dir = ensure_writable_dir(out_dir)
    target = ensure_writable_dir(Path(os.path.expanduser(str(opts["out"]))) if opts["out"] else out_dir / "teacher_cache",
                                 "cache.out")
    vocab = len(tokenizer)
    if opts["top_k"] > vocab:
        log.warning("cache.top_k=%d exceeds the vocabulary (%d tokens): every logit is kept", opts["top_k"], vocab)
    model, teacher_path = live.load(cfg, tokenizer, runtime)
    teacher = LiveTeacher(model, vocab, split_head=bool(cfg.trainer.get("split_head", True)))
    chunk = chunking.resolve_chunk_size(cfg.trainer.get("chunk_size", "auto"), vocab, runtime.device)
    data_cache = Path(str(cfg.cache_dir)).expanduser() / "datasets"
    splits = {name: data_mod.build_split(cfg.dataset, tokenizer, name, cache_dir=data_cache,
                                         limit=cfg.trainer.get("eval_examples") if name == "validation" else None)
              for name in opts["splits"]}
    # what a cache folder must agree on to be resumed (paths may move; contents may not change)
    identity = {"format": FORMAT, "top_k": min(opts["top_k"], vocab), "dtype": opts["dtype"],
                "temperatures": list(temperatures), "shard_examples": opts["shard_examples"],
                "teacher_signature": teacher_signature(str(teacher_path)),
                "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": vocab}
    split_ids = {name: {"fingerprint": s.fingerprint, "num_examples": len(s.dataset),
                        "num_response_tokens": s.stats.get("num_response_tokens")} for name, s in splits.items()}
    base = {"teacher": models.describe(cfg.teacher), "teacher_path": str(teacher_path),
            "tokenizer_name": getattr(tokenizer, "name_or_path", None),
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True)}
    started = time.perf_counter()
    with file_lock(target / ".lock"):  # one writer per cache folder
        meta, old, _ = _open_meta(target, identity, split_ids, base, opts["shard_examples"])
        log.info("caching the top-%d logits of teacher %s over %s (%s) into %s", identity["top_k"], meta["teacher"],
                 ", ".join(f"{n}: {len(s.dataset)} examples" for n, s in splits.items()),
                 ", ".join(f"T={t:g}" for t in temperatures), target)
        written = _write(teacher, splits, target, meta, old, opts, temperatures, chunk, pad_id(tokenizer), runtime,
                         identity)
    size = sum(f.stat().st_size for f in target.rglob("*.safetensors"))
    summary = {"command": "cache-teacher", "status": "completed", "cache": str(target), "top_k": identity["top_k"],
               "temperatures": list(temperatures), "dtype": opts["dtype"], "device": runtime.device_name,
               "precision": runtime.precision, "shards_written": written["new"], "shards_reused": written["skipped"],
               "bytes": size, "time_s": round(time.perf_counter() - started, 3),
               "splits": {n: {"examples": v["num_examples"], "response_tokens": v["num_response_tokens"]}
                          for n, v in split_ids.items()}}
    atomic_write_json(out_dir / "summary.json", summary)
    log.info("teacher cache complete: %s (%.1f MB, %d shards written, %d reused); distil from it with "
             "rlkd distill teacher.cache=%s", target, size / 1e6, written["new"], written["skipped"], target)
    return summary
