"""Generation and reference perplexity with a causal LM: batched, KV cache, left padding, stop at EOS.

Prompts are encoded as in training (a BOS prefix when the tokenizer adds one, no EOS), sorted by
length and left-padded into batches; ``model.generate`` continues them with its KV cache, stopping
each row at an EOS id (the tokenizer's and the model's generation config's). Used by ``rlkd
evaluate``, ``rlkd generate`` and the on-policy rollouts of ``rlkd distill``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlkd_cli.data import dataset as data_mod
from rlkd_cli.data.loader import pad_id
from rlkd_cli.errors import require
from rlkd_cli.losses.divergences import cross_entropy
from rlkd_cli.metrics import shift_for_next_token

log = logging.getLogger("rlkd.generation")


def _bos_prefix(tokenizer) -> list[int]:
    """The BOS prefix training sequences start with (shared with :mod:`rlkd_cli.dataset`)."""
    return [int(t) for t in data_mod._bos_prefix(tokenizer)]


def _stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any eos ids of the model's generation config (e.g. Llama 3's several)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]):
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    require(len(ids) > 0, "the tokenizer has no eos token, so generation could never stop; use a causal-LM tokenizer")
    return ids


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config (``max_position_embeddings``, ``n_positions``...)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt as training saw it (BOS prefix when the tokenizer adds one, no eos).

    A prompt longer than ``max_prompt_tokens`` keeps its prefix and its last tokens (cut from the
    left, like training's truncation, so the text right before the answer survives). An empty prompt
    becomes ``[eos]`` (a start token, GPT-2 style). Returns ``(ids, number of truncated prompts)``.
    """
    prefix = _bos_prefix(tokenizer)
    out: list[list[int]] = []
    truncated = 0
    for start in range(0, len(prompts), 1000):
        chunk = tokenizer(list(prompts[start:start + 1000]), add_special_tokens=False)["input_ids"]
        for ids in chunk:
            ids = prefix + list(ids)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                keep = max(max_prompt_tokens - len(prefix), 1)
                ids = prefix + ids[len(ids) - keep:]
                truncated += 1
            if not ids:
                ids = [int(tokenizer.eos_token_id)]
            out.append(ids)
    return out, truncated


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn: greedy (``do_sample=False``), or temperature / nucleus (``top_p``) / top-k
    sampling (``top_k=0``: no top-k cut)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p),
                "top_k": int(self.top_k)}


class HFGenerator:
    """Generation with ``transformers``' ``model.generate``: batched, KV cache, left padding, per-row EOS stop.

    The seam for a faster generator (e.g. vLLM for large on-policy runs) is this class's one method:
    :meth:`continuations` takes token-id prompts and returns token-id continuations; nothing else in
    rlkd calls ``model.generate``.
    """

    name = "hf"

    @torch.no_grad()
    def continuations(self, model, prompts: Sequence[Sequence[int]], *, pad: int, stops: Sequence[int],
                      sampling: Sampling) -> list[tuple[list[int], bool]]:
        """``(tokens up to and including the first stop id, whether it stopped)`` for each prompt, in order.

        Runs under ``no_grad`` with the model in eval mode (dropout off), restored to its mode after; the
        prompts are left-padded into one batch with an attention mask (``generate`` derives the position
        ids from it, so a padded row computes what it would alone). Sampling draws from torch's global RNG.
        """
        if not prompts:
            return []
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for j, ids in enumerate(prompts):
            input_ids[j, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[j, width - len(ids):] = 1
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=int(sampling.max_new_tokens), pad_token_id=int(pad),
                                 eos_token_id=list(stops), use_cache=True, num_beams=1, **sampling.kwargs())
        finally:
            model.train(was_training)
        results = []
        stop_set = set(int(t) for t in stops)
        for tokens in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(tokens) if t in stop_set), None)
            results.append((tokens[:cut + 1], True) if cut is not None else (tokens, False))
        return results


GENERATORS = {"hf": HFGenerator}


def stop_ids(model, tokenizer) -> list[int]:
    """The ids generation stops at (:func:`_stop_ids`)."""
    return _stop_ids(model, tokenizer)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             max_prompt_tokens: int | None = None, progress=None) -> list[str]:
    """Continuations of ``prompts`` (in order), decoded without the prompt and cut at the first eos.

    Prompts are encoded as in training (:func:`encode_prompts`), sorted by length, left-padded into
    batches of ``batch_size`` and continued by :class:`HFGenerator` for at most ``max_new_tokens``
    tokens, stopping a row at eos. Greedy unless ``do_sample`` (then temperature, nucleus ``top_p``
    and ``top_k`` sampling, seeded with ``seed``). The decoded continuation has special tokens
    skipped and surrounding whitespace stripped.
    """
    return [text for text, _, _ in generate_rows(model, tokenizer, prompts, batch_size=batch_size,
                                                  sampling=Sampling(max_new_tokens, do_sample, temperature, top_p,
                                                                    top_k),
                                                  seed=seed, max_prompt_tokens=max_prompt_tokens, progress=progress)]


@torch.no_grad()
def generate_rows(model, tokenizer, prompts: Sequence[str], *, batch_size: int, sampling: Sampling, seed: int = 0,
                  max_prompt_tokens: int | None = None, progress=None) -> list[tuple[str, bool, int]]:
    """:func:`generate`'s continuations with, for each, whether it ended at eos and its number of tokens."""
    require(batch_size >= 1 and sampling.max_new_tokens >= 1,
            "generate needs batch_size >= 1 and max_new_tokens >= 1")
    if not prompts:
        return []
    ids, truncated = encode_prompts(tokenizer, prompts, max_prompt_tokens=max_prompt_tokens)
    if truncated:
        log.warning("%d of %d prompts were longer than %d tokens and were cut from the left", truncated,
                    len(prompts), max_prompt_tokens)
    pad, stops = pad_id(tokenizer), _stop_ids(model, tokenizer)
    if sampling.do_sample:
        torch.manual_seed(int(seed))
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(int(seed))
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    outputs: list[tuple[str, bool, int]] = [("", False, 0)] * len(ids)
    generator = HFGenerator()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, (tokens, ended) in zip(rows, generator.continuations(model, [ids[i] for i in rows], pad=pad,
                                                                     stops=stops, sampling=sampling)):
            body = tokens[:-1] if ended else tokens
            outputs[i] = (tokenizer.decode(body, skip_special_tokens=True).strip(), ended, len(tokens))
        if progress is not None:
            progress(len(rows))
    return outputs


@torch.no_grad()
def reference_perplexity(model, tokenizer, dataset_cfg, split: str, *, limit: int | None,
                         batch_size: int) -> dict[str, float]:
    """Perplexity of the split's reference responses: ``exp(sum NLL / tokens)`` over the positions
    with ``labels != -100`` (response tokens and their eos; every token for ``text`` data sets).

    Returns ``{"perplexity": value, "perplexity_tokens": tokens, "perplexity_sequences": sequences}``; like training's validation, the
    log-softmax is over the tokenizer's vocabulary (padding rows of the output layer cut off) and
    the mean NLL is capped at 50 before ``exp``.
    """
    device = next(model.parameters()).device
    split_data = data_mod.build_split(dataset_cfg, tokenizer, split, limit=limit)
    ds = split_data.dataset
    pad, vocab = pad_id(tokenizer), len(tokenizer)
    lengths = [len(x) for x in ds["input_ids"]]
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = data_mod.collate([ds[i] for i in order[start:start + batch_size]], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, targets, mask = shift_for_next_token(logits, batch["labels"], vocab)
            nll += float(cross_entropy(logits, None, mask, labels=targets, reduction="sum"))
            count += int(mask.sum())
    finally:
        model.train(was_training)
    require(count > 0, f"dataset '{data_mod.dataset_cfg(dataset_cfg)['name']}' split '{split}' has no reference "
                       "tokens to measure perplexity on; check the dataset and split")
    return {"perplexity": math.exp(min(nll / count, 50.0)), "perplexity_tokens": count,
            "perplexity_sequences": len(ds)}

