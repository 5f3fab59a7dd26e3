"""The recipe's optimizer step as packed, padding-free token rows of a fixed budget.

One optimizer step holds batch_size x grad_accum rows, exactly as the recipe and the hf engine see them. They
are executed as micro-batches of ONE row of `budget` tokens holding whole documents back to back (first-fit
decreasing), so every micro-batch has one of a few static shapes [1, size] (the budget, or a smaller size from
the planner when the row's documents fit it: what torch.compile needs) and no padding inside it: only a trailing
segment of ignored padding fills the row.

Per token: `position_ids` restart at 0 per document (RoPE / learned positions see each document alone),
`document_ids` say which document it belongs to (the attention masks keep documents apart; padding is -1),
and `targets` are the labels shifted by one WITHIN the document (the next token of the same document, or -100),
so no target crosses a document boundary.

Normalisation (the hf engine's, so both engines optimize the same function):
  sft      : loss = sum of token cross-entropies / trained tokens of the whole optimizer step: the Trainer's
             `num_items_in_batch` (it counts labels[..., 1:] != -100 over all micro-batches of the step).
  classify : loss = sum over the recipe's micro-batches of their mean cross-entropy. The Trainer passes
             num_items_in_batch to GPT2ForSequenceClassification (its forward takes **kwargs), the model's loss
             ignores it and takes a per-micro-batch mean, and the Trainer then skips its 1/grad_accum scaling;
             so each row weighs 1 / (rows in its recipe micro-batch). Identical to a mean when grad_accum is 1.

A row longer than the budget cannot be packed without cutting a document (its second part would not see the
first): `pack_step` refuses it with a PeftlabError; the planner keeps the budget >= data.max_length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from peftlab.errors import PeftlabError

IGNORE_INDEX = -100
PAD_DOCUMENT = -1
Task = Literal["sft", "classify"]


@dataclass
class PackedBatch:
    """One micro-batch: one row of `budget` tokens. Shapes: T = budget, D = documents in the row.

    input_ids, position_ids [1, T] int64; document_ids [T] int32 (-1 = trailing padding);
    targets [T] int64 (next token of the same document, -100 = none); target_weights [T] float32 (weight of
    each target's cross-entropy in the step's loss, 0 where there is none);
    pooled_positions [D] int64, class_labels [D] int64, class_weights [D] float32 (classify only, else empty).
    Counts (host ints, for throughput and the MFU formula): tokens (non-padding), documents, trained
    (targets or classified rows), sum_sq (sum of squared document lengths: the attention FLOPs).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    targets: torch.Tensor
    target_weights: torch.Tensor
    pooled_positions: torch.Tensor
    class_labels: torch.Tensor
    class_weights: torch.Tensor
    tokens: int
    documents: int
    trained: int
    sum_sq: int

    @property
    def budget(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(**{f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                              for f in fields(self)})


@dataclass
class _Document:
    ids: list[int]
    targets: list[int]  # already shifted: targets[t] is what position t predicts
    weight: float  # per target (sft) or per row (classify)
    label: int | None
    pooled: int  # position inside the document that classify pools


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """labels [L] (as the tasks produce them: label t = token t, -100 = not trained) -> targets [L]: position t
    predicts labels[t + 1]; the document's last position predicts nothing."""
    return [int(x) for x in labels[1:]] + [IGNORE_INDEX]


def last_non_pad(ids: Sequence[int], pad_token_id: int | None) -> int:
    """The position GPT2ForSequenceClassification pools: the rightmost token that is not the pad id (0 when
    every token is the pad id, as its argmax gives)."""
    if pad_token_id is None:
        return len(ids) - 1
    for position in range(len(ids) - 1, -1, -1):
        if ids[position] != pad_token_id:
            return position
    return 0


def trained_targets(rows: Sequence[Mapping[str, Any]]) -> int:
    """Targets an sft step trains: labels[1:] != -100 per row (the Trainer's num_items_in_batch)."""
    return sum(sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX) for row in rows)


def _documents(rows: Sequence[Mapping[str, Any]], task: Task, batch_size: int, pad_token_id: int | None,
               step_trained: int | None = None, world: int = 1) -> list[_Document]:
    docs = []
    if task == "sft":
        shifted = [shifted_targets(row["labels"]) for row in rows]
        trained = step_trained or sum(sum(1 for t in targets if t != IGNORE_INDEX) for targets in shifted)
        weight = 1.0 / max(trained, 1)  # an all-masked step trains nothing; the task refuses such data earlier
        for row, targets in zip(rows, shifted, strict=True):
            docs.append(_Document(list(row["input_ids"]), targets, weight, None, len(targets) - 1))
        return docs
    for start in range(0, len(rows), batch_size):
        micro = rows[start:start + batch_size]
        for row in micro:
            ids = list(row["input_ids"])
            label = row["labels"] if "labels" in row else row["label"]
            docs.append(_Document(ids, [IGNORE_INDEX] * len(ids), 1.0 / (len(micro) * world), int(label),
                                  last_non_pad(ids, pad_token_id)))
    return docs


def _bins(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: document indices per row. Longest first keeps the row count near its minimum."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[index] <= room:
                rows[r].append(index)
                free[r] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(budget - lengths[index])
    return [sorted(r) for r in rows]  # documents keep their order inside a row (no effect on the math)


def row_size(tokens: int, budget: int, sizes: Sequence[int] = ()) -> int:
    """The smallest of `sizes` (static row shapes below the budget) that holds `tokens`, else the budget."""
    return min((s for s in sizes if tokens <= s <= budget), default=budget)


def pack_step(rows: Sequence[Mapping[str, Any]], budget: int, task: Task, batch_size: int,
              pad_token_id: int | None = None, sizes: Sequence[int] = (), step_trained: int | None = None,
              world: int = 1) -> list[PackedBatch]:
    """The rows of one optimizer step (batch_size x grad_accum of them, in the order the recipe's micro-batches
    take them) -> packed micro-batches of at most `budget` tokens each, in the normalisation of the module docstring.

    rows: mappings with input_ids (list of ints) and, for sft, labels (list, -100 = not trained); for classify,
    labels or label (a class id). sizes: smaller static row shapes; a packed row that fits one is cut to the
    smallest that holds it (less trailing padding; each size is one more compiled shape). Data parallel, `rows` is
    one process's share of the step: step_trained = the whole step's trained targets (sft), world = processes
    (classify), so that the processes' losses and gradients SUM to the step's (as DDP's mean of the Trainer's
    per-process losses, which for sft are scaled by the processes). Errors: PeftlabError for an empty row or one
    longer than the budget.
    """
    docs = _documents(rows, task, batch_size, pad_token_id, step_trained, world)
    lengths = [len(d.ids) for d in docs]
    if lengths and min(lengths) == 0:
        raise PeftlabError("data: an empty row (no tokens) reached the fast engine; fix: drop empty rows")
    if lengths and max(lengths) > budget:
        raise PeftlabError(f"train token budget: a row of {max(lengths)} tokens does not fit a packed row of {budget} "
                           f"tokens (documents are never cut); fix: raise the token budget to >= data.max_length")
    return [_pack_row([docs[i] for i in row], row_size(sum(lengths[i] for i in row), budget, sizes), task)
            for row in _bins(lengths, budget)]


def _pack_row(docs: list[_Document], budget: int, task: Task) -> PackedBatch:
    ids = torch.zeros(budget, dtype=torch.long)  # padding ids are never attended to by real tokens nor trained
    positions = torch.zeros(budget, dtype=torch.long)
    document_ids = torch.full((budget,), PAD_DOCUMENT, dtype=torch.int32)
    targets = torch.full((budget,), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(budget, dtype=torch.float32)
    pooled, labels, class_weights = [], [], []
    at = 0
    for d, doc in enumerate(docs):
        n = len(doc.ids)
        span = slice(at, at + n)
        ids[span] = torch.tensor(doc.ids)
        positions[span] = torch.arange(n)
        document_ids[span] = d
        doc_targets = torch.tensor(doc.targets)
        targets[span] = doc_targets
        weights[span] = (doc_targets != IGNORE_INDEX).float() * doc.weight
        if task == "classify":
            pooled.append(at + doc.pooled)
            labels.append(doc.label)
            class_weights.append(doc.weight)
        at += n
    trained = len(docs) if task == "classify" else int((targets != IGNORE_INDEX).sum())
    return PackedBatch(
        input_ids=ids[None], position_ids=positions[None], document_ids=document_ids, targets=targets,
        target_weights=weights, pooled_positions=torch.tensor(pooled, dtype=torch.long),
        class_labels=torch.tensor(labels, dtype=torch.long), class_weights=torch.tensor(class_weights, dtype=torch.float32),
        tokens=at, documents=len(docs), trained=trained, sum_sq=sum(len(d.ids) ** 2 for d in docs),
    )


def steps_per_epoch(rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch as the Trainer counts them: ceil(ceil(rows / batch_size) / grad_accum)."""
    return math.ceil(math.ceil(rows / batch_size) / grad_accum)


def total_steps(rows: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """train.max_steps when set, else ceil(epochs x steps per epoch) (TrainingArguments' rule)."""
    return max_steps or math.ceil(epochs * steps_per_epoch(rows, batch_size, grad_accum))


def step_rows(dataset: Sequence[Mapping[str, Any]], batch_size: int, grad_accum: int, seed: int,
              first_epoch: int = 0) -> Iterator[list[Mapping[str, Any]]]:
    """The rows of each optimizer step, epoch after epoch (endless; the loop stops at total_steps): a seeded
    permutation per epoch cut into steps of batch_size x grad_accum rows, the last step of an epoch shorter
    (as the Trainer's). The order is the fast engine's own, not the Trainer's sampler."""
    if not len(dataset):  # an endless loop over nothing would never yield
        raise ValueError("step_rows: the dataset has no rows")
    per_step = batch_size * grad_accum
    epoch = first_epoch
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), per_step):
            yield [dataset[i] for i in order[start:start + per_step]]
        epoch += 1


def packed_steps(steps: Iterable[Sequence[Mapping[str, Any]]], budget: int, task: Task, batch_size: int,
                 pad_token_id: int | None = None, sizes: Sequence[int] = (), rank: int = 0,
                 world: int = 1) -> Iterator[list[PackedBatch]]:
    """pack_step over a stream of steps (lazily: packing runs on the host while the device works). Several
    processes: every process sees the whole step's rows (the same seeded order) and packs rows[rank::world]."""
    for rows in steps:
        trained = trained_targets(rows) if task == "sft" and world > 1 else None
        yield pack_step(rows[rank::world], budget, task, batch_size, pad_token_id, sizes, trained, world)
