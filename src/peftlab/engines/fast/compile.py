"""Regional torch.compile of the repeated decoder blocks, with a persistent compile cache.

Regional: each decoder layer is compiled with static shapes (dynamic=False); all layers share one compiled
graph (same code, same shapes), so compile time is that of one block, not of the whole model, and the
LoRA layers inside the block are fused with it. Static shapes hold because every micro-batch is one packed row
of the same token budget.

Persistent cache: torch's portable "mega-cache" (torch.compiler.save_cache_artifacts / load_cache_artifacts,
inductor's FX-graph, AOTAutograd and Triton kernels in one blob) is written under
$PEFTLAB_CACHE/compile/<key>/ after the first compiled step and loaded before the next run compiles, so a
second run of the same recipe skips most of the compile time. The key covers what makes a compiled graph
invalid: the model config, the token budget, precision, checkpointing, the device and library versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from peftlab.engines.fast.loss import chunk_loss_and_grad
from peftlab.engines.fast.model import FastModel
from peftlab.models.presets import cache_root
from peftlab.runs import atomic_dir

ARTIFACTS = "artifacts.bin"


# Graph variants per static row shape of one layer graph: the first layer's input needs no gradient (frozen
# embeddings) and the others' does; Gemma's sliding and full layers take different mask functions: 3 on Gemma
# 2/3, x2 when activation checkpointing is switched on after a plain trial. Dynamo's default of 8 entries per
# function was hit on the H200 with two row shapes (bench/README.md, Issue 11); past it, dynamo silently runs
# the layer eagerly. So the limit is raised for the process (dynamo's config is process-wide).
RECOMPILE_LIMIT = 32


def compile_layers(model: FastModel, mode: str | None = None, backend: str = "inductor") -> int:
    """Compile every decoder layer of `model` in place (nn.Module.compile); returns the number of layers.
    mode: torch.compile mode (None = default; "max-autotune-no-cudagraphs" tunes GEMMs longer)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in model.decoder_layers:
        layer.compile(dynamic=False, mode=mode, backend=backend)
    return len(model.decoder_layers)


def uncompile_layers(model: FastModel) -> None:
    """Give the decoder layers back their eager forward (after training: evaluation and generation run padded
    batches of ever-changing shapes, on which the static-shape compiled layers would recompile until dynamo's
    recompile limit). nn.Module.compile keeps its compiled call in `_compiled_call_impl` and torch has no public
    way back; None is the attribute's value before compile()."""
    for layer in model.decoder_layers:
        layer._compiled_call_impl = None


def eager() -> contextlib.AbstractContextManager:
    """Run compiled code eagerly inside the block (an evaluation between training steps): no new compile, no
    recompile, and the compiled graphs stay for the next training step."""
    return torch.compiler.set_stance("force_eager")


def compile_loss_core(model: FastModel, backend: str = "inductor") -> None:
    """Fuse the elementwise passes of the chunked LM loss (softcap, softmax, gradient) over each [chunk x vocab]
    block of logits into a few kernels; chunks have one static shape (plus the last one's)."""
    model.ce_core = torch.compile(chunk_loss_and_grad, dynamic=False, backend=backend)


def cache_key(model: FastModel, budget: int, gradient_checkpointing: bool, sizes: tuple[int, ...] = ()) -> str:
    """A short hash of everything a compiled graph depends on (architecture, quantization, shapes: the budget and
    the smaller row sizes, dtypes, versions, device)."""
    return peft_cache_key(model.peft_model, model.task, model.precision, budget, gradient_checkpointing, sizes)


def peft_cache_key(peft_model: Any, task: str, precision: str, budget: int, gradient_checkpointing: bool,
                   sizes: tuple[int, ...] = ()) -> str:
    """`cache_key` of the FastModel that `peft_model` would become (auto asks it before any FastModel exists)."""
    import peft
    import transformers

    lora = peft_model.peft_config[peft_model.active_adapter]
    return graph_key({
        "config": peft_model.get_base_model().config.to_dict(), "budget": [budget, *sizes], "precision": precision,
        "task": task, "checkpointing": gradient_checkpointing,
        "lora": {"r": lora.r, "targets": sorted(lora.target_modules)},
        "transformers": transformers.__version__, "peft": peft.__version__,
    }, next(peft_model.parameters()).device)


def graph_key(parts: dict[str, Any], device: torch.device) -> str:
    """A short hash of `parts` (what one kind of compiled graph depends on) and of what every compiled graph
    depends on: the torch and Python versions and the device's name. Used by the fast engine and the diffusion
    task's compiled UNet (tasks/diffusion_speed.py)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    parts = {**parts, "torch": torch.__version__, "python": platform.python_version(), "device": name}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_custom_autograd_graphs() -> None:
    """Let torch's AOTAutograd cache keep graphs that hold a custom autograd.Function (process-wide, as dynamo's
    config is). bitsandbytes' 4-bit matmul is one (MatMul4Bit), so every QLoRA graph was "Bypassing autograd cache
    due to: Unsupported call_function target autograd_function_apply": a warm compile cache still re-ran AOTAutograd
    on each graph (SD 1.5 QLoRA's warm start 77 s against LoRA's 26 s on the H200, bench/README.md "Issue 15").
    Safe here: dynamo traces the Function's forward and backward into the graph (autograd_function_apply's
    subgraphs), so they are part of the cache key; torch leaves it off by default out of caution, not a known fault."""
    config = torch._functorch.config
    if hasattr(config, "autograd_cache_allow_custom_autograd_functions"):  # an older torch has no such switch
        config.autograd_cache_allow_custom_autograd_functions = True


class CompileCache:
    """The mega-cache file of one key: load() before compiling, save() after the first compiled step."""

    def __init__(self, key: str, root: Path | None = None) -> None:
        self.folder = (root or cache_root() / "compile") / key

    @property
    def path(self) -> Path:
        return self.folder / ARTIFACTS

    def load(self) -> bool:
        """True when artifacts were found and handed to torch (the next compile reuses them). Called before each
        compile (cold or warm), it also lets the AOTAutograd cache keep graphs with custom autograd functions."""
        cache_custom_autograd_graphs()
        if not self.path.is_file():
            return False
        torch.compiler.load_cache_artifacts(self.path.read_bytes())
        return True

    def save(self) -> dict[str, Any] | None:
        """Write what this process compiled so far (atomically); returns {"bytes": n} or None when empty."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        blob, _info = saved
        if not blob:
            return None
        with atomic_dir(self.folder) as tmp:
            (tmp / ARTIFACTS).write_bytes(blob)
        return {"bytes": len(blob)}
