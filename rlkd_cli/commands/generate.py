"""``rlkd generate``: a model's responses to a dataset's prompts, as JSON Lines that ``dataset=jsonl`` reads back.

The model: ``model=teacher`` (default; the tiny teacher is trained on first use, as ``rlkd sft``
does), ``model=student``, ``model.name_or_path=PATH`` (any model folder or hub id), or
``checkpoints=[A,B,...]`` (one file each). The prompts: the first ``limit`` (default 256; ``null``: all)
of the dataset's ``split=`` (default ``test``): the whole 20,000-prompt train split of the embedded task
takes over an hour on a CPU.

Output (in the run dir): ``generations.jsonl`` (``generations/<folder name>.jsonl`` per checkpoint),
one line per prompt ``{"id", "prompt", "response", "reference", "model", "role", "ended_with_eos",
"generated_tokens"}`` in the split's order, written a batch at a time; ``generations.json`` (what
was generated with what); ``summary.json``. ``rlkd distill dataset=jsonl dataset.path=<file>`` then
trains on the generated responses (offline sequence-level KD when the teacher wrote them: with no
``teacher.name_or_path`` the model that wrote the file is the teacher, never a new tiny one).

Resumable: ``resume=true`` in the same run dir continues each file after its last complete line,
if it was written with the same model, data and generation settings (else one line saying what
differs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlkd_cli import models, schema
from rlkd_cli.data import dataset as data_mod
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.engine.progress import Progress
from rlkd_cli.errors import require
from rlkd_cli.generation import Sampling, context_length, generate_rows
from rlkd_cli.io import atomic_write_json, dumps, ensure_writable_dir, jsonl_lines
from rlkd_cli.runtime import Runtime

log = logging.getLogger("rlkd.generate")


def _models(cfg: DictConfig, runtime: Runtime) -> list[dict[str, Any]]:
    """``{"label", "path", "file", "role"}`` for each model to generate with."""
    checkpoints = [str(c) for c in (cfg.get("checkpoints") or [])]
    if checkpoints:
        names = [Path(c).name or f"model{i}" for i, c in enumerate(checkpoints)]
        files = [f"generations/{n}.jsonl" if names.count(n) == 1 else f"generations/{i}-{n}.jsonl"
                 for i, n in enumerate(names)]
        for c in checkpoints:
            require(Path(c).expanduser().is_dir(), f"checkpoint '{c}' is not a folder; pass model folders written by "
                                                   "rlkd (checkpoints/step-*) or save_pretrained")
        return [{"label": c, "path": c, "file": f, "role": "checkpoint"} for c, f in zip(checkpoints, files)]
    role = str(cfg.model.role)
    path = cfg.model.get("name_or_path") or cfg[role].get("name_or_path")
    if not path and role == "teacher":
        from rlkd_cli.teachers import tiny

        tokenizer = tok_mod.for_run(cfg, [("teacher", cfg.teacher)])
        path = str(tiny.ensure_trained(cfg, tokenizer, runtime))
    require(bool(path), f"the {role} config is an untrained arch spec: nothing to generate with; pass "
                        f"model.name_or_path=PATH or checkpoints=[PATH] (e.g. a distill run's checkpoints/step-*)")
    return [{"label": str(path), "path": str(path), "file": "generations.jsonl", "role": role}]


def _done(path: Path, meta: dict[str, Any], meta_path: Path, resume: bool) -> list[str]:
    """The ids already written to ``path`` (resume), after checking it was written the same way."""
    if not path.exists():
        return []
    require(resume, f"{path} exists; continue it with resume=true, or generate into another run dir "
                    "(hydra.run.dir=...)")
    try:
        old = json.loads(meta_path.read_text()).get(str(path.name), {})
    except (OSError, ValueError):
        old = {}
    changed = [k for k, v in meta.items() if old.get(k) != v]
    require(not changed, f"cannot resume {path}: it was written with other settings ({', '.join(changed[:4])} "
                         "differ); generate into another run dir")
    text = path.read_text(encoding="utf-8")
    ids, keep = [], []
    for _, line in jsonl_lines(text):
        try:
            ids.append(str(json.loads(line)["id"]))
            keep.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by a killed run: it and what follows are written again
    path.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
    return ids


def _generate_one(spec: dict[str, Any], cfg: DictConfig, runtime: Runtime, run_dir: Path,
                  examples: list[dict]) -> dict[str, Any]:
    gc = cfg.generation
    sampling = Sampling(int(gc.max_new_tokens), bool(gc.do_sample), float(gc.temperature), float(gc.top_p),
                        int(gc.top_k))
    folder = Path(spec["path"]).expanduser()
    own = not folder.is_dir() or any((folder / f).is_file() for f in tok_mod.TOKENIZER_FILES)
    tokenizer = tok_mod.for_run(cfg, [(spec["role"], {"name_or_path": spec["path"]})] if own else
                                [("teacher", cfg.teacher)])
    tok_mod.check_model_tokenizer(spec["path"], tokenizer, role=spec["role"])
    model = models.load_pretrained(spec["path"], role=spec["role"], trust_remote_code=bool(
        cfg.model.get("trust_remote_code", False)), dtype=torch.bfloat16 if runtime.precision == "bf16" else None)
    models.check_vocab(model, tokenizer, role=spec["role"])
    model.to(runtime.device).eval()
    out = run_dir / spec["file"]
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": spec["path"], "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "split": str(cfg.split), "generation": OmegaConf.to_container(gc, resolve=True),
            "tokenizer": tok_mod.fingerprint(tokenizer)}
    meta_path = run_dir / "generations.json"
    done = set(_done(out, meta, meta_path, bool(cfg.resume)))
    todo = [ex for ex in examples if ex["id"] not in done]
    all_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    atomic_write_json(meta_path, {**all_meta, out.name: meta})
    ctx = context_length(model)
    max_prompt = ctx - sampling.max_new_tokens if ctx else None
    require(max_prompt is None or max_prompt > 0, f"generation.max_new_tokens={sampling.max_new_tokens} leaves no "
            f"room for the prompt in {spec['label']}'s context of {ctx} tokens; lower generation.max_new_tokens")
    bar = Progress(enabled=bool(cfg.trainer.get("progress", True)), total=len(examples), start=len(done),
                   label=f"generate {Path(spec['label']).name}")
    stats = {"written": 0, "eos": 0, "tokens": 0}
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), int(gc.batch_size)):
            part = todo[start:start + int(gc.batch_size)]
            with runtime.autocast():
                rows = generate_rows(model, tokenizer, [ex["prompt"] for ex in part], batch_size=int(gc.batch_size),
                                     sampling=sampling, seed=int(gc.seed) + start, max_prompt_tokens=max_prompt)
            for ex, (text, ended, n) in zip(part, rows):
                f.write(dumps({"id": ex["id"], "prompt": ex["prompt"], "response": text, "reference": ex["reference"],
                               "model": spec["label"], "role": spec["role"], "ended_with_eos": ended,
                               "generated_tokens": n},
                              ensure_ascii=False) + "\n")
                stats.update(written=stats["written"] + 1, eos=stats["eos"] + int(ended), tokens=stats["tokens"] + n)
            f.flush()
            bar.count(len(done) + start + len(part))
    bar.close()
    del model
    return {"model": spec["label"], "file": str(out), "examples": len(examples), "resumed_after": len(done),
            "written": stats["written"], "eos_share": stats["eos"] / max(stats["written"], 1),
            "mean_generated_tokens": stats["tokens"] / max(stats["written"], 1)}


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    schema.validate(cfg)
    run_dir = ensure_writable_dir(run_dir)
    runtime = Runtime.create(cfg.trainer)
    examples = data_mod.load_examples(cfg.dataset, str(cfg.split))
    require(len(examples) > 0, f"dataset split '{cfg.split}' has no prompts; check dataset.path and dataset.limit")
    if cfg.get("limit") is not None and int(cfg.limit) < len(examples):
        log.info("generating for the first %d of the %d prompts of the %s split (limit=%d; limit=null for all)",
                 int(cfg.limit), len(examples), cfg.split, int(cfg.limit))
        examples = examples[:int(cfg.limit)]
    rows = [_generate_one(spec, cfg, runtime, run_dir, examples) for spec in _models(cfg, runtime)]
    for row in rows:
        log.info("wrote %s: %d responses (%d before a resume), %.0f%% ended with eos, %.1f tokens on average",
                 row["file"], row["written"] + row["resumed_after"], row["resumed_after"], 100 * row["eos_share"],
                 row["mean_generated_tokens"])
    summary = {"command": "generate", "status": "completed", "split": str(cfg.split), "models": rows}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


__all__ = ["run"]
