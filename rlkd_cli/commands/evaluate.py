"""``rlkd evaluate``: downstream metrics of models, or of an existing predictions file.

Sources of outputs (exactly one):

* models: ``model.name_or_path=PATH`` and/or ``checkpoints=[A,B,...]`` and/or ``include_teacher=true``
  (the teacher's row, labelled ``teacher``). Each model generates a continuation of every prompt of
  the split (batched, KV cache, greedy unless ``eval.do_sample``) and is scored on it;
* ``predictions=FILE.jsonl``: lines ``{"id": ..., "prediction": "..."}`` (an optional ``model`` key
  groups lines into rows, so a ``predictions.jsonl`` written by this command can be re-scored),
  scored against the references of the split without loading any model. Every example in scope
  (the split, or its first ``eval.limit``) counts: an example without a prediction scores as an
  empty prediction (a wrong answer, ROUGE-L 0), so 4 right answers of 32 are accuracy 0.125 with
  coverage 4/32, never 1.0; partial coverage is a warning and a column of the table.

The metric comes from the dataset config (``dataset.metric``): ``accuracy`` (GSM8K, synthetic_math) and
``rougeL`` (Dolly, XSum) as :mod:`rlkd_cli.scoring` defines them, and

``perplexity`` (text, jsonl)
    ``exp(sum NLL / number of reference tokens)`` over the response tokens (the ``labels != -100``
    positions of :func:`rlkd_cli.data.dataset.build_split`, including the eos that ends each response),
    as in training's validation ``ppl``; no generation. For the other metrics the same perplexity is
    reported too when ``eval.perplexity=true``.

Each model uses its own tokenizer: ``tokenizer.name_or_path`` when set, else the tokenizer saved in
the model folder (rlkd checkpoints carry theirs), else the teacher's/embedded one
(:func:`rlkd_cli.data.tokenizer.for_run`).

Output (in the run dir): ``results.json`` (dataset, split, metric, and one row per model with
``accuracy``/``rougeL``/``perplexity`` as they apply and the counts ``examples`` and ``scored``; a
predictions file's rows also ``predicted``, ``missing`` and ``coverage`` = predicted / examples),
``predictions.jsonl`` (one line per example and model: ``id``, ``model``, ``prompt``,
``prediction``, ``reference`` and the example's score ``correct`` or ``rougeL``), and a rich table
on the console.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlkd_cli import models
from rlkd_cli.data import dataset as data_mod
from rlkd_cli.data import tokenizer as tok_mod
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.generation import context_length, generate, reference_perplexity
from rlkd_cli.io import atomic_write_json, atomic_write_text, dumps, ensure_writable_dir
from rlkd_cli.runtime import choose_device_and_precision
from rlkd_cli.scoring import read_predictions, score_predictions

log = logging.getLogger("rlkd.evaluate")

# ----------------------------------------------------------------------------------------------
# Config checks and sources
# ----------------------------------------------------------------------------------------------

def validate_eval(ec: Any) -> dict[str, Any]:
    """``eval.*`` as plain values, checked against :class:`rlkd_cli.schema.EvalConfig` before anything is loaded."""
    from omegaconf import OmegaConf

    from rlkd_cli import schema

    schema.check(ec, schema.EvalConfig, "eval")
    out = {**{f: getattr(schema.EvalConfig(), f) for f in schema.EvalConfig.__dataclass_fields__},
           **(OmegaConf.to_container(ec, resolve=True) if OmegaConf.is_config(ec) else dict(ec))}
    return out


def _model_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The models to evaluate: model.name_or_path, then checkpoints, then the teacher (if asked)."""
    specs: list[dict[str, Any]] = []
    mcfg = cfg.get("model") or {}
    if mcfg.get("name_or_path"):
        name = str(mcfg.name_or_path)
        require(Path(name).expanduser().exists() or not models._looks_local(name),
                f"model.name_or_path '{name}' does not exist; set it to a model folder (save_pretrained, or an rlkd "
                "checkpoints/step-* folder) or a hub id")
        specs.append({"label": str(mcfg.name_or_path), "role": "model", "path": str(mcfg.name_or_path),
                      "trust_remote_code": bool(mcfg.get("trust_remote_code", False))})
    checkpoints = cfg.get("checkpoints") or []
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    for c in checkpoints:
        path = Path(str(c)).expanduser()
        require(path.is_dir(), f"checkpoint '{c}' is not a folder; pass model folders written by rlkd "
                "(checkpoints/step-*) or save_pretrained, e.g. checkpoints=[outputs/distill/RUN/checkpoints/step-000300]")
        require((path / "config.json").is_file(), f"checkpoint '{c}' is not a model folder (no config.json); pass "
                "a checkpoints/step-* folder of an rlkd run, or a folder written by save_pretrained")
        models.check_source(str(c), key="checkpoints")  # weights there too, before any model loads
        specs.append({"label": str(c), "role": "checkpoint", "path": str(c),
                      "trust_remote_code": bool(mcfg.get("trust_remote_code", False))})
    seen: dict[str, str] = {}
    for s in specs:
        local = Path(s["path"]).expanduser()
        key = str(local.resolve()) if local.exists() else s["path"]
        if key in seen:
            raise RlkdError(f"model '{s['label']}' is given twice (as '{seen[key]}' too) in model.name_or_path / "
                            "checkpoints; list each model once")
        seen[key] = s["label"]
    include_teacher = cfg.get("include_teacher", False)
    require(isinstance(include_teacher, bool), f"include_teacher must be true or false, got {include_teacher!r}")
    if include_teacher:
        specs.append({"label": "teacher", "role": "teacher", "path": None,
                      "trust_remote_code": bool(cfg.teacher.get("trust_remote_code", False))})
    return specs



# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

class _Run:
    """State shared by the steps of one evaluation: config, checked eval settings, metric, tokenizers."""

    def __init__(self, cfg: DictConfig, ev: dict[str, Any]):
        self.cfg = cfg
        self.ev = ev
        self.split = str(cfg.get("split", "test"))
        self.metric = data_mod.metric_name(cfg.dataset)
        self.dataset_name = data_mod.dataset_cfg(cfg.dataset)["name"]
        self._fallback_tokenizer = None
        self._tokenizers: dict[str, Any] = {}

    def fallback_tokenizer(self):
        """``tokenizer.name_or_path``, else the teacher's tokenizer, else the embedded BPE."""
        if self._fallback_tokenizer is None:
            self._fallback_tokenizer = tok_mod.for_run(self.cfg, [("teacher", self.cfg.teacher)])
        return self._fallback_tokenizer

    def tokenizer_for(self, path: str, role: str = "model"):
        """The tokenizer a model folder carries; ``tokenizer.name_or_path`` wins (and must be the folder's own
        if it has one); else the fallback."""
        if self.cfg.tokenizer.get("name_or_path"):
            tok = self.fallback_tokenizer()
            tok_mod.check_model_tokenizer(path, tok, role=role)
            return tok
        if path in self._tokenizers:
            return self._tokenizers[path]
        local = Path(path).expanduser()
        if local.is_dir():
            if any((local / f).exists() for f in tok_mod.TOKENIZER_FILES):
                tok = tok_mod.load_tokenizer(str(local), config_key="tokenizer.name_or_path")
            else:
                log.info("'%s' has no tokenizer files: using the teacher's/embedded tokenizer", path)
                tok = self.fallback_tokenizer()
        elif not local.exists() and not models._looks_local(path):
            tok = tok_mod.load_tokenizer(path, config_key="tokenizer.name_or_path")  # a hub id
        else:
            tok = self.fallback_tokenizer()
        self._tokenizers[path] = tok
        return tok


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate the configured source (models or a predictions file); write results.json and predictions.jsonl."""
    from rlkd_cli import schema

    schema.validate(cfg)
    ev = validate_eval(cfg.eval)
    specs = _model_specs(cfg)
    predictions = cfg.get("predictions")
    if predictions is not None and str(predictions).strip() == "":
        predictions = None
    if predictions is not None and specs:
        raise RlkdError("give one source of outputs: predictions=FILE.jsonl scores a file without models; drop "
                        "model.name_or_path / checkpoints / include_teacher, or drop predictions")
    if predictions is None and not specs:
        raise RlkdError("nothing to evaluate; pass model.name_or_path=PATH, checkpoints=[A,B], include_teacher=true, "
                        "or predictions=FILE.jsonl (lines {\"id\": ..., \"prediction\": ...})")
    out_dir = ensure_writable_dir(out_dir)
    state = _Run(cfg, ev)
    if predictions is not None:
        rows, lines = _evaluate_predictions_file(state, str(predictions))
        source = "predictions"
    else:
        rows, lines = _evaluate_models(state, specs)
        source = "models"
    result = {
        "command": "evaluate", "source": source, "dataset": state.dataset_name, "split": state.split,
        "metric": state.metric, "predictions_file": str(predictions) if predictions is not None else None,
        "eval": ev, "models": rows,
    }
    atomic_write_json(out_dir / "results.json", result)
    atomic_write_text(out_dir / "predictions.jsonl",
                      "".join(dumps(line, ensure_ascii=False) + "\n" for line in lines))
    log.info("wrote %s and %s (%d lines)", out_dir / "results.json", out_dir / "predictions.jsonl", len(lines))
    _print_table(result)
    return result


def _prediction_lines(label: str, examples: list[dict], preds: list[str], per: list[dict]) -> list[dict]:
    return [{"id": ex["id"], "model": label, "prompt": ex["prompt"], "prediction": pred,
             "reference": ex["reference"], **extra} for ex, pred, extra in zip(examples, preds, per)]


def _evaluate_predictions_file(state: _Run, path: str) -> tuple[list[dict], list[dict]]:
    """Score a predictions file against the split's references (no model is loaded)."""
    cfg = state.cfg
    require(state.metric != "perplexity",
            f"dataset '{state.dataset_name}' is scored by perplexity, which needs a model, not a predictions "
            "file; pass model.name_or_path=PATH, or a dataset with metric accuracy or rougeL")
    groups = read_predictions(path, default_label=str(path))
    all_examples = data_mod.load_examples(cfg.dataset, state.split)
    known = {ex["id"] for ex in all_examples}
    examples = all_examples[: state.ev["limit"]] if state.ev["limit"] is not None else all_examples
    in_scope = {ex["id"] for ex in examples}
    unknown = [i for g in groups.values() for i in g if i not in known]
    if unknown:
        id_field = data_mod.dataset_cfg(cfg.dataset)["id_field"]
        hint = (f"ids are the values of the dataset's '{id_field}' column" if id_field else
                f"ids are the row indices 0..{len(all_examples) - 1} of the split")
        shown = ", ".join(repr(i) for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise RlkdError(f"{len(unknown)} prediction id(s) in '{path}' are not in dataset '{state.dataset_name}' "
                        f"split '{state.split}' ({len(all_examples)} examples): {shown}; {hint}")
    rows, lines = [], []
    for label, preds_by_id in groups.items():
        predicted = [ex for ex in examples if ex["id"] in preds_by_id]
        ignored = sum(1 for i in preds_by_id if i not in in_scope)
        missing = len(examples) - len(predicted)
        if ignored:
            log.info("%s: %d prediction(s) beyond eval.limit=%s ignored", label, ignored, state.ev["limit"])
        require(len(predicted) > 0, f"'{path}' has no prediction for the first {len(examples)} examples "
                f"of dataset '{state.dataset_name}' split '{state.split}'; check the ids or eval.limit")
        if missing:
            log.warning("%s: %d of %d examples have no prediction; each scores as a wrong answer (coverage %d/%d)",
                        label, missing, len(examples), len(predicted), len(examples))
        # every example of the split in scope counts: a missing prediction is an empty one, never left out
        preds = [preds_by_id.get(ex["id"], "") for ex in examples]
        corpus, per = score_predictions(state.metric, preds, [ex["reference"] for ex in examples])
        rows.append({"model": label, "role": "predictions", "path": str(path), state.metric: corpus[state.metric],
                     "examples": len(examples), "scored": corpus["scored"], "predicted": len(predicted),
                     "missing": missing, "coverage": len(predicted) / len(examples)})
        kept = [i for i, ex in enumerate(examples) if ex["id"] in preds_by_id]
        lines.extend(_prediction_lines(label, [examples[i] for i in kept], [preds[i] for i in kept],
                                       [per[i] for i in kept]))
    return rows, lines


def _teacher_path(cfg: DictConfig, tokenizer) -> str:
    """The teacher's model folder (the tiny teacher is trained first if it is missing)."""
    if cfg.teacher.get("name_or_path"):
        return str(cfg.teacher.name_or_path)
    from rlkd_cli.runtime import Runtime
    from rlkd_cli.teachers import tiny

    return str(tiny.ensure_trained(cfg, tokenizer, Runtime.create(cfg.trainer)))


def _evaluate_models(state: _Run, specs: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Generate with and score every model in turn (one model in memory at a time)."""
    cfg, ev = state.cfg, state.ev
    device, precision = choose_device_and_precision(cfg.trainer)
    dtype = torch.bfloat16 if precision == "bf16" else None
    generate_text = state.metric in ("accuracy", "rougeL")
    examples = data_mod.load_examples(cfg.dataset, state.split, limit=ev["limit"]) if generate_text else []
    if generate_text:
        require(len(examples) > 0, f"dataset '{state.dataset_name}' split '{state.split}' has no examples; "
                "check dataset.path and eval.limit")
    rows, lines = [], []
    for spec in specs:
        if spec["role"] == "teacher":
            spec["path"] = _teacher_path(cfg, state.fallback_tokenizer())
        tokenizer = state.tokenizer_for(spec["path"], role=spec["role"])
        log.info("evaluating %s (%s) on %s/%s", spec["label"], spec["path"], state.dataset_name, state.split)
        model = models.load_pretrained(spec["path"], role=spec["role"] if spec["role"] != "checkpoint" else "model",
                                       dtype=dtype, trust_remote_code=spec["trust_remote_code"])
        models.check_vocab(model, tokenizer, role="the teacher" if spec["role"] == "teacher" else f"'{spec['label']}'")
        model.to(device).eval()
        row: dict[str, Any] = {"model": spec["label"], "role": spec["role"], "path": str(spec["path"])}
        if generate_text:
            limit_ctx = context_length(model)
            max_prompt = None
            if limit_ctx is not None:
                require(ev["max_new_tokens"] < limit_ctx,
                        f"eval.max_new_tokens={ev['max_new_tokens']} leaves no room for the prompt in "
                        f"{spec['label']}'s context of {limit_ctx} tokens; lower eval.max_new_tokens")
                max_prompt = limit_ctx - ev["max_new_tokens"]
            t0 = time.perf_counter()
            with _progress(bool(cfg.trainer.get("progress", True)), len(examples), spec["label"]) as advance:
                preds = generate(model, tokenizer, [ex["prompt"] for ex in examples], batch_size=ev["batch_size"],
                                 max_new_tokens=ev["max_new_tokens"], do_sample=ev["do_sample"],
                                 temperature=ev["temperature"], top_p=ev["top_p"], seed=ev["seed"],
                                 max_prompt_tokens=max_prompt, progress=advance)
            gen_time = time.perf_counter() - t0
            corpus, per = score_predictions(state.metric, preds, [ex["reference"] for ex in examples])
            row[state.metric] = corpus[state.metric]
            row.update(examples=len(examples), scored=corpus["scored"], generation_time_s=round(gen_time, 3))
            lines.extend(_prediction_lines(spec["label"], examples, preds, per))
        if state.metric == "perplexity" or ev["perplexity"]:
            log.info("%s: perplexity of the %s references", spec["label"], state.split)
            ppl = reference_perplexity(model, tokenizer, cfg.dataset, state.split, limit=ev["limit"],
                                       batch_size=ev["batch_size"])
            row.update(ppl)
            if not generate_text:
                row.update(examples=ppl["perplexity_sequences"], scored=ppl["perplexity_sequences"])
        rows.append(row)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, lines


class _progress:
    """Progress over generated examples, as ``distill`` shows its steps (:class:`rlkd_cli.engine.progress.Progress`):
    a bar on a terminal, a plain ``[evaluate MODEL] 16/32 | ... elapsed, ETA ...`` line every tenth elsewhere
    (a SLURM log, a pipe); a no-op with ``trainer.progress=false``. Yields ``advance(n)``."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        from rlkd_cli.engine.progress import Progress

        self.bar = Progress(enabled=self.enabled, total=self.total, start=0,
                            label=f"evaluate {Path(self.label).name or self.label}")
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            self.bar.count(done[0])

        return advance

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from rlkd_cli.alignment import short_label

    metric = result["metric"]
    table = Table(title=f"rlkd evaluate: {result['dataset']}/{result['split']} ({metric})")
    table.add_column("model", no_wrap=True)
    columns = [metric] if metric != "perplexity" else []
    if any("perplexity" in r for r in result["models"]):
        columns.append("perplexity")
    for c in columns:
        table.add_column({"accuracy": "accuracy", "rougeL": "ROUGE-L", "perplexity": "ppl"}[c], justify="right")
    table.add_column("examples", justify="right")
    table.add_column("scored", justify="right")
    partial = any(r.get("missing") for r in result["models"])
    if partial:
        table.add_column("coverage", justify="right")
    for r in result["models"]:
        cells = [_fmt(r.get(c), 4 if c == "accuracy" else 2 if c == "rougeL" else 3) for c in columns]
        cells += [str(r.get("examples", "-")), str(r.get("scored", "-"))]
        if partial:
            cells.append(f"{r['predicted']}/{r['examples']}" if "predicted" in r else "-")
        name = r["model"] if r.get("role") in ("teacher", "predictions") else short_label(str(r["model"]))
        table.add_row(Text(name), *cells)
    console = Console()
    if not console.is_terminal:  # logs and pipes: no 80-column squeeze
        console = Console(width=200)
    console.print(table)


__all__ = ["run", "validate_eval"]
