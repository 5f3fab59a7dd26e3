"""Dolly-format instruction records -> model-ready examples with the loss on response tokens only.

We tokenize ourselves (prompt and response separately) instead of letting trl do it, so the label
mask is exact by construction (-100 on every prompt token, the response ids plus EOS trained) and
the doctor and the guard can count, before any GPU time is spent, how many tokens the loss sees.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from peftlab.config import DataConfig
from peftlab.data.fingerprint import code_digest, map_fingerprint, tokenizer_digest
from peftlab.data.sources import load_table, map_columns
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.watch.progress import phase

IGNORE_INDEX = -100
FIELDS = ("instruction", "response")
OPTIONAL_FIELDS = ("context", "category")


def render_prompt(row: dict[str, Any], cfg: DataConfig) -> str:
    context = (row.get("context") or "").strip()
    block = cfg.context_block.format(context=context) if context else ""
    try:
        return cfg.template.format(instruction=(row["instruction"] or "").strip(), context_block=block, context=context)
    except (KeyError, IndexError) as exc:
        raise PeftlabError(
            f"data.template: unknown placeholder {exc}; allowed: {{instruction}}, {{context}}, {{context_block}}"
        ) from None


def prompt_ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a rendered prompt, with the tokenizer's special tokens and at most one BOS: a template that
    starts with the BOS text (`<bos>...`) on a tokenizer that adds BOS itself would give `<bos><bos>`, which
    the model never saw in pretraining (trl#1400 hit the same with chat templates and turned the tokenizer's
    special tokens off; we keep them, so that a template without BOS still gets one). Training, the doctor
    and `generate` all encode prompts here."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos and adds_bos(tokenizer):
        return ids[1:]
    return ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding puts BOS in front by itself (Gemma, Llama do; GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def encode(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> dict[str, Any]:
    prompt = prompt_ids(render_prompt(row, cfg), tokenizer)
    response_ids = tokenizer((row["response"] or "").strip(), add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt + response_ids)[: cfg.max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response_ids)[: cfg.max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "prompt_tokens": len(prompt),
        "full_tokens": len(prompt) + len(response_ids),
        "empty_response": not (row["response"] or "").strip(),
    }


@dataclass
class DataStats:
    rows: int
    train_rows: int
    eval_rows: int
    dropped_fully_masked: int
    truncated: int
    truncation_rate: float
    tokens_mean: float
    tokens_median: float
    tokens_p90: float
    tokens_max: int
    trained_tokens: int
    masked_tokens: int
    empty_responses: int = 0  # rows that train the end-of-sequence token alone

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InstructionData:
    train: Any
    eval: Any | None
    stats: DataStats


def load_records(cfg: DataConfig, seed: int) -> Any:
    table = load_table(cfg.source, cfg.split)
    table = as_text(map_columns(table, FIELDS, OPTIONAL_FIELDS, cfg.columns, cfg.source), cfg.source)
    # Bundled Dolly rows come grouped by category: shuffle before anything is cut off or split.
    table = table.shuffle(seed=seed)
    if cfg.max_samples:
        table = table.select(range(min(cfg.max_samples, len(table))))
    return table


def as_text(table: Any, source: str) -> Any:
    """Every field as a string column: scalars (a CSV column of numbers, an all-empty column) are cast,
    nested values (lists, objects) are refused."""
    from datasets import Value

    for name, feature in table.features.items():
        if not isinstance(feature, Value):
            raise PeftlabError(
                f"data.source '{source}': the {name} column holds {type(feature).__name__.lower()} values, not text; "
                f"fix: point data.columns.{name} at a text column"
            )
        if feature.dtype not in ("string", "large_string"):
            table = table.cast_column(name, Value("string"))
    return table


def check_template_fits(cfg: DataConfig, tokenizer: Any) -> None:
    """The bare template (empty instruction and context) must leave room for a response token."""
    bare = len(prompt_ids(render_prompt({"instruction": "", "context": ""}, cfg), tokenizer))
    if cfg.max_length <= bare:
        raise PeftlabError(
            f"data.max_length: {cfg.max_length} is not longer than the prompt template alone ({bare} tokens), so no "
            f"response token could be trained; fix: raise data.max_length well above {bare} or shorten data.template"
        )


def build_instruction_data(cfg: DataConfig, tokenizer: Any, seed: int) -> InstructionData:
    check_template_fits(cfg, tokenizer)
    table = load_records(cfg, seed)
    # datasets' own cache, keyed by what encode() reads (the table's file and order, the tokenizer, the template,
    # max_length, the code): a second run of the recipe loads the rows (data/fingerprint.py says why it is explicit).
    fingerprint = map_fingerprint(table, tokenizer_digest(tokenizer), cfg.template, cfg.context_block,
                                  cfg.max_length, code_digest(encode, prompt_ids, render_prompt, adds_bos))
    with phase("tokenizing", total=len(table)) as progress:
        encoded = table.map(lambda row: (progress.advance(), encode(row, tokenizer, cfg))[1],
                            remove_columns=table.column_names, new_fingerprint=fingerprint)
        progress.advance(len(table))  # a cache hit never calls encode(): the rows are ready all the same
    empty = sum(encoded["empty_response"])
    if empty == len(encoded):
        column = cfg.columns.get("response", "response")
        raise PeftlabError(
            f"data.source '{cfg.source}': every response (column '{column}') is empty in the {len(encoded)} rows, so "
            "the only trained token would be the end-of-sequence: the model would learn to answer nothing; fix: point "
            "data.columns.response at the column that holds the answers"
        )
    trained = [sum(1 for x in labels if x != IGNORE_INDEX) for labels in encoded["labels"]]
    keep = [i for i, n in enumerate(trained) if n > 0]
    if not keep:
        shortest = min(encoded["prompt_tokens"])
        raise GuardFailure(
            f"every example has all its labels masked: data.max_length={cfg.max_length} is not longer than any prompt "
            f"(shortest prompt: {shortest} tokens), so the loss would see no token (loss 0.0 / NaN); "
            f"fix: raise data.max_length above {shortest} or shorten data.template"
        )
    stats = _stats(encoded, trained, len(table) - len(keep), cfg.max_length)
    stats.empty_responses = empty
    encoded = encoded.select(keep).select_columns(["input_ids", "labels"])
    train, evaluation = _split(encoded, cfg, seed)
    stats.train_rows, stats.eval_rows = len(train), len(evaluation) if evaluation is not None else 0
    return InstructionData(train, evaluation, stats)


def _split(encoded: Any, cfg: DataConfig, seed: int) -> tuple[Any, Any | None]:
    if cfg.eval_fraction == 0:
        return encoded, None
    n_eval = max(1, round(len(encoded) * cfg.eval_fraction))
    if cfg.eval_max_samples:
        n_eval = min(n_eval, cfg.eval_max_samples)
    if n_eval >= len(encoded):
        raise PeftlabError(
            f"data.eval_fraction: {cfg.eval_fraction} leaves no training rows out of {len(encoded)}; fix: lower it or use more data"
        )
    parts = encoded.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _stats(encoded: Any, trained: list[int], dropped: int, max_length: int) -> DataStats:
    full = encoded["full_tokens"]
    lengths = sorted(min(n, max_length) for n in full)
    truncated = sum(1 for n in full if n > max_length)
    total = sum(lengths)
    return DataStats(
        rows=len(full),
        train_rows=0,
        eval_rows=0,
        dropped_fully_masked=dropped,
        truncated=truncated,
        truncation_rate=round(truncated / len(full), 4),
        tokens_mean=round(total / len(lengths), 1),
        tokens_median=float(statistics.median(lengths)),
        tokens_p90=float(lengths[int(0.9 * (len(lengths) - 1))]),
        tokens_max=lengths[-1],
        trained_tokens=sum(trained),
        masked_tokens=total - sum(trained),
    )
