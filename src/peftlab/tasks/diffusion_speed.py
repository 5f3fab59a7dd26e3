"""The diffusion task's fast UNet step (`diffusion.speed`): what runs the recipe's training faster without changing it.

- attention: `model.attn_implementation` auto/sdpa = diffusers' AttnProcessor2_0 (torch SDPA: flash / memory-efficient
  kernels), eager = the classic AttnProcessor (softmax(QK^T)V in three ops);
- channels_last: the UNet's weights (and the latents fed to it) in NHWC, the layout cuDNN's convolutions run natively
  (NCHW costs a transpose around every conv);
- micro-batch: the images of one optimizer step (train.batch_size x train.grad_accum) regrouped into the largest
  micro-batch that the memory measured on two probe steps allows, so the GPU sees bigger kernels and fewer launches
  while every optimizer step still averages the gradient over the same images;
- torch.compile of the UNet (inductor fuses the norms, activations, LoRA branches and casts around the GEMMs and
  convolutions), with CUDA graphs when the shapes are static (`mode="reduce-overhead"`: one graph replay instead of
  thousands of kernel launches, which is what bounds the plain loop: bench-hf BASELINE-H100.md); the compile cache is
  the fast engine's persistent one (engines/fast/compile.py: CompileCache), keyed here by the UNet's config;
- fused AdamW: one kernel for all LoRA tensors instead of a loop over them;
- the compile watch (`CompileWatch`): graphs, graph breaks and CUDA-graph skips counted over the run (summary.json
  `compile`, a warning line for each kind found), the ways a compiled step gets slow without failing. A 4-bit UNet
  is one graph: bitsandbytes' Linear4bit runs through its own torch.library ops and dequantizes again in backward
  (no bf16 weight kept for it), once the biases its forward would cast in place are cast up front
  (models/diffusion.py settle_4bit_biases).

The compiled UNet is a separate callable (torch.compile wraps the module, the module is untouched): the adapter is
saved from, and the sample grid drawn with, the eager module, so sampling's other shapes never recompile it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.config import Recipe, TrainConfig
from peftlab.engines.fast.compile import CompileCache, graph_key

GIB = 1024**3
# The share of the GPU's memory a planned micro-batch may fill (the rest: optimizer states, the allocator's
# fragmentation, CUDA graph pools), unless train.memory_limit_gib says otherwise.
MEMORY_SHARE = 0.85
# torch.compile's backend; the tests use "eager" (dynamo's graph capture without code generation: seconds, not minutes
# on a CPU).
BACKEND = "inductor"


@dataclass
class SpeedPlan:
    """What `apply` decided: the micro-batch, the compiled UNet (None = eager) and what the summary records."""

    micro_batch: int
    grad_accum: int
    compiled: Any | None = None
    cuda_graphs: bool = False
    channels_last: bool = False
    cache: CompileCache | None = None
    watch: CompileWatch | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def job_train(self, recipe: Recipe) -> TrainConfig:
        """The train config the engine runs: the regrouped micro-batch and, when asked, the fused optimizer."""
        t = recipe.train
        optimizer = t.optimizer
        if recipe.diffusion.speed.fused_optimizer and optimizer == "adamw_torch":
            optimizer = "adamw_torch_fused"
        return t.model_copy(update={"batch_size": self.micro_batch, "grad_accum": self.grad_accum, "optimizer": optimizer})

    def save_compile_cache(self) -> dict[str, Any] | None:
        return self.cache.save() if self.cache is not None else None


class CompileWatch:
    """What torch.compile did with the UNet while training: graphs captured, graph breaks (each break is one more
    graph to compile and one more CUDA graph to replay, with eager Python between them) and CUDA-graph skips (the step
    then runs without graphs). These are the ways a compiled step degrades without failing; dynamo's and inductor's
    process-wide counters are read as differences over the run."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> dict[str, Any]:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"]["unique_graphs"], "breaks": dict(counters["graph_break"]),
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}

    def report(self) -> dict[str, Any]:
        now = self._read()
        breaks = {msg: n - self.start["breaks"].get(msg, 0) for msg, n in now["breaks"].items()}
        breaks = {msg: n for msg, n in breaks.items() if n > 0}
        return {"graphs": now["graphs"] - self.start["graphs"], "graph_breaks": sum(breaks.values()),
                "break_reasons": [msg.splitlines()[0][:200] for msg in sorted(breaks, key=breaks.get, reverse=True)[:3]],
                "cudagraph_skips": now["cudagraph_skips"] - self.start["cudagraph_skips"]}

    @staticmethod
    def warnings(report: dict[str, Any]) -> list[str]:
        """One line per degradation found, with where to look."""
        out = []
        if report["graph_breaks"]:
            out.append(f"the compiled UNet has {report['graph_breaks']} graph breaks ({report['graphs']} graphs; first: "
                       f"{report['break_reasons'][0]}); TORCH_LOGS=graph_breaks shows where")
        if report["cudagraph_skips"]:
            out.append(f"CUDA graphs were skipped {report['cudagraph_skips']} time(s): that step ran without them; "
                       "TORCH_LOGS=cudagraphs says why")
        return out


def set_attention(unet: Any, attn_implementation: str) -> str:
    """The UNet's attention processor for `model.attn_implementation` (auto = sdpa); returns its class name."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor() if attn_implementation == "eager" else AttnProcessor2_0())
    return type(next(iter(unet.attn_processors.values()))).__name__


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_micro_batch(per_step: int, fixed_bytes: float, per_image_bytes: float, limit_bytes: float) -> int:
    """The largest divisor d of `per_step` whose predicted peak fixed + d x per_image stays within `limit_bytes`
    (at least 1). The prediction is linear in the batch: activations scale with it, weights do not."""
    fits = [d for d in divisors(per_step) if fixed_bytes + d * per_image_bytes <= limit_bytes]
    return max(fits, default=1)


def measure_peaks(loss_of: Callable[[int], torch.Tensor], params: list[torch.nn.Parameter], device: torch.device,
                  sizes: tuple[int, int] = (1, 2)) -> tuple[int, int]:
    """Peak CUDA memory (bytes) of one forward + backward at each of two micro-batch sizes. The RNG is forked, so the
    probes draw nothing from the training's random stream, and the gradients they leave are dropped."""
    peaks = []
    with torch.random.fork_rng(devices=[device]):
        for size in sizes:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            loss_of(size).backward()
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
            for p in params:
                p.grad = None
    torch.cuda.empty_cache()
    return peaks[0], peaks[1]


def plan_micro_batch(recipe: Recipe, device: torch.device, loss_of: Callable[[int], torch.Tensor],
                     params: list[torch.nn.Parameter]) -> tuple[int, dict[str, Any]]:
    """The micro-batch for `diffusion.speed.micro_batch` and the measurement behind it."""
    t, choice = recipe.train, recipe.diffusion.speed.micro_batch
    per_step = t.batch_size * t.grad_accum
    if isinstance(choice, int):
        return choice, {"micro_batch_from": "recipe (diffusion.speed.micro_batch)"}
    if choice == "recipe":
        return t.batch_size, {"micro_batch_from": "recipe"}
    if per_step == t.batch_size:
        return t.batch_size, {"micro_batch_from": "auto: train.batch_size is the whole optimizer step"}
    if device.type != "cuda":
        return t.batch_size, {"micro_batch_from": "auto: train.batch_size (only CUDA memory is measured)"}
    one, two = measure_peaks(loss_of, params, device)
    per_image, fixed = two - one, 2 * one - two
    limit = (t.memory_limit_gib * GIB if t.memory_limit_gib else
             MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory)
    micro = largest_micro_batch(per_step, fixed, per_image, limit)
    return micro, {"micro_batch_from": "auto (measured)", "probe_peak_gib": [round(one / GIB, 3), round(two / GIB, 3)],
                   "per_image_gib": round(per_image / GIB, 3), "limit_gib": round(limit / GIB, 2),
                   "predicted_peak_gib": round((fixed + micro * per_image) / GIB, 2)}


def compiles(recipe: Recipe, device: torch.device) -> bool:
    setting = recipe.diffusion.speed.compile
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_key(unet: Any, recipe: Recipe, micro_batch: int, precision: str, mode: str | None,
                device: torch.device) -> str:
    """A short hash of what a compiled UNet graph depends on (architecture, LoRA, method, shapes, dtypes, versions)."""
    import diffusers
    import peft

    lora = recipe.method.lora
    return graph_key({"unet": dict(unet.config), "micro_batch": micro_batch, "resolution": recipe.data.images.resolution,
                      "precision": precision, "method": recipe.method.name, "quant": recipe.method.quant.model_dump(),
                      "lora": {"r": lora.r, "targets": lora.target_modules, "dropout": lora.dropout}, "mode": mode,
                      "channels_last": recipe.diffusion.speed.channels_last, "backend": BACKEND,
                      "diffusers": diffusers.__version__, "peft": peft.__version__}, device)


def apply(recipe: Recipe, unet: Any, device: torch.device, precision: str, micro_batch: int,
          micro_from: dict[str, Any]) -> SpeedPlan:
    """channels_last and torch.compile (+ CUDA graphs) of the UNet for `micro_batch` images per forward pass."""
    speed, t = recipe.diffusion.speed, recipe.train
    plan = SpeedPlan(micro_batch, t.batch_size * t.grad_accum // micro_batch, facts=dict(micro_from))
    if micro_batch != t.batch_size:
        plan.notes.append(f"micro-batch: {t.batch_size} x {t.grad_accum} images per optimizer step run as "
                          f"{micro_batch} x {plan.grad_accum} (diffusion.speed.micro_batch: {speed.micro_batch})")
    if speed.channels_last:  # the convolutions' weights only: 4-bit Linear weights are packed, not images
        for module in unet.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        plan.channels_last = True
    if compiles(recipe, device):
        plan.cuda_graphs = speed.cuda_graphs and device.type == "cuda"
        mode = "reduce-overhead" if plan.cuda_graphs else None
        plan.cache = CompileCache(compile_key(unet, recipe, micro_batch, precision, mode, device))
        warm = plan.cache.load()
        plan.watch = CompileWatch()
        # Static shapes: every micro-batch has the same size except an epoch's last partial one (one more graph).
        plan.compiled = torch.compile(unet, dynamic=False, mode=mode, backend=BACKEND)
        plan.notes.append(f"UNet compiled ({BACKEND}{', CUDA graphs' if plan.cuda_graphs else ''}); compile cache "
                          f"{'warm' if warm else 'cold'}: {plan.cache.folder}")
        plan.facts["compile_cache_warm"] = warm
    plan.facts.update(micro_batch=micro_batch, grad_accum=plan.grad_accum, channels_last=plan.channels_last,
                      compiled=plan.compiled is not None, cuda_graphs=plan.cuda_graphs)
    return plan
