"""The health guard: stop a broken run within a few logging steps, with the probable causes and a fix.

It reads raw values. The HF Trainer's default `logging_nan_inf_filter=True` replaces NaN losses by
the mean of recent valid ones, and when every step in the window is NaN that mean is 0: that is the
`loss 0.0, grad_norm nan` of the original Gemma-2 logs. Our trainer turns the filter off. What stops a run:
- a non-finite loss or grad norm;
- a loss of exactly 0.0 in a window where no label token was trained (or where that is unknown). With
  trained tokens in the window (the SFT loop also refuses any batch without one) and a finite grad norm,
  0.0 is a memorised training set: convergence, which runs on;
- divergence: every one of the last `window` logged losses above `factor` x the lowest of the first `window`.
  The early minimum catches a loss that blows up within the first logs (classify at lr=10: 1.6 -> 110 at the
  second step); asking the whole recent window to stay high keeps one noisy log (diffusion losses swing 10x
  between timesteps) from stopping a healthy run.
The diagnosis names only the causes that apply to this run's family, precision, attention, method and lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import WatchConfig
from peftlab.errors import GuardFailure

# LoRA recipes train at 1e-4 .. 5e-4 (peft's and trl's examples); above this a too-high lr is a likely cause.
HIGH_LR = 1e-3


@dataclass
class RunContext:
    """What the guard knows about the run, to name the probable cause."""

    model_type: str
    precision: str
    attn_implementation: str
    lr: float
    method: str
    compute_dtype: str = "auto"  # qlora's 4-bit compute dtype as the recipe sets it (auto = the precision)


@dataclass(frozen=True)
class Divergence:
    """The divergence rule (see the module docstring); factor None turns it off."""

    factor: float | None = 10.0
    window: int = 5


@dataclass
class HealthGuard:
    context: RunContext
    patience: int = 1
    divergence: Divergence = field(default_factory=Divergence)
    _strikes: int = field(default=0, init=False)
    _losses: list[float] = field(default_factory=list, init=False)

    def check_log(self, step: int, logs: dict[str, Any]) -> None:
        """`logs`: the logged loss, grad_norm and, when known, trained_tokens (label tokens in this window)."""
        problem = self.problem(logs) or self._diverged(logs.get("loss"))
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
        if loss is not None and loss == 0.0 and not logs.get("trained_tokens"):
            return "loss is exactly 0.0" + (" with no trained label token" if "trained_tokens" in logs else "")
        return None

    def _diverged(self, loss: float | None) -> str | None:
        rule = self.divergence
        if loss is None or rule.factor is None:
            return None
        self._losses.append(loss)
        if len(self._losses) < rule.window:
            return None
        early, recent = min(self._losses[: rule.window]), min(self._losses[-rule.window:])
        if early > 0 and recent > rule.factor * early:
            return (f"loss diverged: the last {rule.window} logged losses are all above {rule.factor:g} x the lowest "
                    f"of the first {rule.window} ({recent:.4g} > {rule.factor:g} x {early:.4g})")
        return None

    def carry(self) -> dict[str, Any]:
        """What a checkpoint carries for a resumed run's guard to decide as the uninterrupted run's: the strikes
        and the logged losses the divergence rule reads (the first and the last window)."""
        w = self.divergence.window
        losses = self._losses if len(self._losses) <= 2 * w else self._losses[:w] + self._losses[-w:]
        return {"strikes": self._strikes, "losses": losses}

    def restore(self, carried: dict[str, Any]) -> None:
        self._strikes, self._losses = carried["strikes"], list(carried["losses"])

    def diagnosis(self, problem: str) -> str:
        """The probable causes of `problem` that apply to this run, most specific first, each with its fix."""
        from peftlab.models.loader import attention_risk

        ctx = self.context
        lr = f"learning rate too high for this setup (train.lr={ctx.lr:g}): try 10x lower, or add warmup"
        if problem.startswith("loss is exactly 0"):
            causes = ["every label in the window is masked (run `peftlab doctor` to see which tokens the loss sees)"]
        elif problem.startswith("loss diverged"):
            causes = [lr]
        else:  # a non-finite loss or grad norm
            compute = ctx.precision if ctx.compute_dtype == "auto" else ctx.compute_dtype
            causes = [cause for cause, applies in (
                ("fp16 overflow: use train.precision=bf16 (or fp32)", ctx.precision == "fp16"),
                (attention_risk(ctx.model_type, ctx.attn_implementation), True),
                ("4-bit compute dtype fp16: set method.quant.compute_dtype=bf16", ctx.method == "qlora" and compute == "fp16"),
                (lr, ctx.lr > HIGH_LR),
            ) if cause and applies]
            causes = causes or ["none of the known ones for this setup: run `peftlab doctor` (one forward+backward), "
                                "try train.precision=fp32, and check the data"]
        return "probable causes: " + "; ".join(causes)


def guard_for(watch: WatchConfig, context: RunContext) -> HealthGuard | None:
    """The recipe's guard (None when watch.guard is off)."""
    if not watch.guard:
        return None
    return HealthGuard(context, watch.patience, Divergence(watch.divergence_factor, watch.divergence_window))


def check_batch_labels(trained_tokens: int, step: int) -> None:
    """A micro-batch whose labels are all -100 gives a NaN (mean CE) or 0.0 (sum) loss: never train on one."""
    if trained_tokens == 0:
        raise GuardFailure(
            f"step {step}: a batch has no unmasked label tokens, so its loss is 0/0; probable cause: prompts fill "
            "data.max_length or the response column is empty; fix: raise data.max_length or check data.columns "
            "(`peftlab doctor` shows the masked tokens)"
        )
