"""The health guard: stop a broken run within a few logging steps, with the probable cause and a fix.

It reads raw values. The HF Trainer's default `logging_nan_inf_filter=True` replaces NaN losses by
the mean of recent valid ones, and when every step in the window is NaN that mean is 0: that is the
`loss 0.0, grad_norm nan` of the original Gemma-2 logs. Our trainer turns the filter off, and the
guard treats loss == 0.0 exactly, a non-finite loss, and a non-finite grad norm as failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import GuardFailure


@dataclass
class RunContext:
    """What the guard knows about the run, to name the probable cause."""

    model_type: str
    precision: str
    attn_implementation: str
    lr: float
    method: str


@dataclass
class HealthGuard:
    context: RunContext
    patience: int = 1
    _strikes: int = field(default=0, init=False)

    def check_log(self, step: int, logs: dict[str, Any]) -> None:
        problem = self.problem(logs)
        if problem is None:
            self._strikes = 0
            return
        self._strikes += 1
        if self._strikes >= self.patience:
            raise GuardFailure(f"step {step}: {problem}; {self.diagnosis(problem)}")

    @staticmethod
    def problem(logs: dict[str, Any]) -> str | None:
        loss, grad = logs.get("loss"), logs.get("grad_norm")
        if loss is not None and not math.isfinite(loss):
            return f"loss is {loss}"
        if grad is not None and not math.isfinite(grad):
            return f"grad_norm is {grad}" + (f" (loss {loss})" if loss is not None else "")
        if loss is not None and loss == 0.0:
            return "loss is exactly 0.0"
        return None

    def diagnosis(self, problem: str) -> str:
        ctx = self.context
        causes = []
        if problem.startswith("loss is exactly 0"):
            causes.append("every label in the window is masked (run `peftlab doctor` to see which tokens the loss sees)")
        if ctx.precision == "fp16":
            causes.append("fp16 overflow: use train.precision=bf16 (or fp32)")
        if ctx.model_type.startswith("gemma") and ctx.attn_implementation not in ("eager", "flex_attention"):
            causes.append(f"{ctx.attn_implementation} attention without Gemma's softcapping: use model.attn_implementation=eager")
        causes.append(f"learning rate too high for this setup (train.lr={ctx.lr:g}): try 10x lower")
        if ctx.method == "qlora":
            causes.append("4-bit compute dtype fp16: set method.quant.compute_dtype=bf16")
        return "probable causes: " + "; ".join(causes)


def check_batch_labels(trained_tokens: int, step: int) -> None:
    """A micro-batch whose labels are all -100 gives a NaN (mean CE) or 0.0 (sum) loss: never train on one."""
    if trained_tokens == 0:
        raise GuardFailure(
            f"step {step}: a batch has no unmasked label tokens, so its loss is 0/0; probable cause: prompts fill "
            "data.max_length or the response column is empty; fix: raise data.max_length or check data.columns "
            "(`peftlab doctor` shows the masked tokens)"
        )
