"""Generation and reference perplexity with a causal LM: batched, KV cache, left padding, stop at EOS.

Prompts are encoded as in training (a BOS prefix when the tokenizer adds one, no EOS), sorted by
length and left-padded into batches; ``model.generate`` continues them with its KV cache, stopping
each row at an EOS id (the tokenizer's and the model's generation config's). Used by ``rlkd
evaluate``, ``rlkd generate`` and the on-policy rollouts of ``rlkd distill``.
"""

from __future__ import annotations

import logging
import math
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


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             max_prompt_tokens: int | None = None, progress=None) -> list[str]:
    """Continuations of ``prompts`` (in order), decoded without the prompt and cut at the first eos.

    Prompts are encoded as in training (:func:`encode_prompts`), sorted by length, left-padded into
    batches of ``batch_size`` with an attention mask (generate derives position ids from it, so a
    padded row computes what it would alone) and continued with ``model.generate`` and its KV cache
    for at most ``max_new_tokens`` tokens, stopping a row at eos. Greedy unless ``do_sample`` (then
    temperature and nucleus ``top_p`` sampling, no top-k, seeded with ``seed``). The decoded
    continuation has special tokens skipped and surrounding whitespace stripped.
    """
    require(batch_size >= 1 and max_new_tokens >= 1, "generate needs batch_size >= 1 and max_new_tokens >= 1")
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, truncated = encode_prompts(tokenizer, prompts, max_prompt_tokens=max_prompt_tokens)
    if truncated:
        log.warning("%d of %d prompts were longer than %d tokens and were cut from the left", truncated,
                    len(prompts), max_prompt_tokens)
    pad, stops = pad_id(tokenizer), _stop_ids(model, tokenizer)
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "pad_token_id": pad, "eos_token_id": stops,
                              "use_cache": True, "num_beams": 1}
    if do_sample:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        torch.manual_seed(int(seed))
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(int(seed))
    else:
        kwargs.update(do_sample=False)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                n = len(ids[i])
                input_ids[j, width - n:] = torch.tensor(ids[i], dtype=torch.long)
                attention_mask[j, width - n:] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            new = out[:, width:].tolist()
            for j, i in enumerate(rows):
                tokens = new[j]
                cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
                outputs[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(rows))
    finally:
        model.train(was_training)
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

