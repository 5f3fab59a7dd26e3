"""Fingerprints for datasets' own map cache, computed from what a tokenization depends on.

datasets caches a `Dataset.map` result on disk (beside the table's arrow files) under the map's fingerprint and
reloads it when the same fingerprint comes again. By default that fingerprint pickles the mapped function with
everything it closes over: a tokenizer with Gemma 3's 262k vocabulary takes 6-11 s of CPU to hash (measured
with `datasets.fingerprint.Hasher`, bench/README.md "CPU: time to the engine"), and a closure holding a
progress bar hashes differently on every run, so nothing was ever reused. We pass `new_fingerprint` instead:
the table's own fingerprint (datasets derives it from the data file's path and modification time and from every
shuffle/select applied since) plus the exact inputs of the encoding.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any


def map_fingerprint(table: Any, *parts: Any) -> str:
    """A datasets fingerprint (16 hex digits) for `table.map(f)` where f's result depends only on `parts`
    (JSON-serialisable; anything else is turned into its str)."""
    key = json.dumps([table._fingerprint, *parts], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of what turns text into ids: the fast tokenizer's whole definition (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor that adds BOS, added tokens), its class and its special tokens. 0.5 s for Gemma
    3's 262k vocabulary on one busy core; a tokenizer without a Rust backend falls back to its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    head = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.bos_token_id,
                       tokenizer.eos_token_id, tokenizer.pad_token_id], sort_keys=True, default=str)
    return hashlib.sha256((head + body).encode()).hexdigest()


def code_digest(*functions: Callable[..., Any]) -> str:
    """sha256 of the functions' source: a changed encoding in a new peftlab version never reuses old rows."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()
