"""What the monitor counts: tokens and samples of the micro-batches a training loop consumed.

Throughput is counted from the batches the training loop actually consumed (see `BatchCounter`),
not from the dataloader, which prefetches one batch ahead. The records themselves are written by the
training hooks (engines/hooks.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.distributed import sum_over_ranks


@dataclass
class BatchCounter:
    """Totals over consumed micro-batches (filled by the trainer's training_step).

    Sums of GPU tensors stay on the GPU until `snapshot()`: turning each micro-batch's count into a
    Python int forces a host sync, which cost up to 20% on Banking77's short steps (bench/README.md).
    Snapshots are taken when the monitor logs, where the Trainer syncs anyway."""

    samples: Any = 0
    tokens: Any = 0  # real, non-padding tokens
    padded_tokens: Any = 0
    trained_tokens: Any = 0

    def add(self, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        if "attention_mask" in inputs:
            self.tokens += inputs["attention_mask"].sum()
            self.samples += ids.shape[0]
        else:  # padding-free: one packed row, sequences start where position_ids == 0
            self.tokens += ids.numel()
            self.samples += (inputs["position_ids"] == 0).sum() if "position_ids" in inputs else ids.shape[0]
        # the fast engine hands over a packed row's real part; "padded_numel" is the row's size, padding included
        self.padded_tokens += inputs.get("padded_numel", ids.numel())
        self.trained_tokens += self.trained_in(inputs["labels"])

    @staticmethod
    def trained_in(labels: Any) -> Any:
        """Label positions the loss sees: a causal LM predicts token t+1 from t, so the first never counts."""
        return (labels[..., 1:] != -100).sum()

    def snapshot(self) -> BatchCounter:
        """The totals as plain ints."""
        return BatchCounter(**{k: int(v) for k, v in vars(self).items()})

    def as_dict(self) -> dict[str, int]:
        return vars(self.snapshot())

    def total(self) -> BatchCounter:
        """The snapshot summed over all ranks of a multi-process run (a collective: every rank calls it)."""
        own = self.snapshot()
        return BatchCounter(*sum_over_ranks([own.samples, own.tokens, own.padded_tokens, own.trained_tokens]))

    def rates_since(self, last: BatchCounter, seconds: float) -> dict[str, Any]:
        """Record fields of these totals (from `total()`) and the rates since the totals `last`."""
        c = self
        return {"tokens": c.tokens, "padded_tokens": c.padded_tokens, "samples": c.samples,
                "tokens_per_s": round((c.tokens - last.tokens) / seconds, 2),
                "padded_tokens_per_s": round((c.padded_tokens - last.padded_tokens) / seconds, 2),
                "samples_per_s": round((c.samples - last.samples) / seconds, 3)}

    def summary(self, runtime: float) -> dict[str, Any]:
        """Throughput fields of a finished run (a collective)."""
        c = self.total()
        return {"samples": c.samples, "samples_per_s": round(c.samples / runtime, 3), "tokens": c.tokens,
                "tokens_per_s": round(c.tokens / runtime, 2), "padded_tokens": c.padded_tokens,
                "padded_tokens_per_s": round(c.padded_tokens / runtime, 2), "trained_tokens": c.trained_tokens}
