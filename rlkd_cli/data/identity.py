"""What identifies a tokenizer: a hash of what it does (its own module, so that the data code that
fingerprints tokenized splits and the tokenizer code that builds tokenizers from data need not import
each other)."""

from __future__ import annotations


def fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer does: its full serialised definition (``tokenizer.json``: vocabulary,
    merges, normaliser, pre-tokeniser, added tokens) and its special tokens; the vocabulary for a slow one."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary
        body = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    special = json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, sort_keys=True)
    return hashlib.sha256((body + "\n" + special).encode("utf-8", "surrogatepass")).hexdigest()[:16]
