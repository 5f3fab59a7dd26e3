"""Text-to-image LoRA/QLoRA on a Stable Diffusion UNet: the loop of diffusers' train_text_to_image_lora.py.

Frozen VAE and text encoder (in the training precision), LoRA on the UNet's attention projections through
peft (`unet.add_adapter`), the UNet in 4-bit for QLoRA, the noise-prediction objective of the scheduler
(epsilon or v-prediction, optional Min-SNR weighting), accelerate for gradient accumulation and mixed
precision. The run folder gets the same metrics.jsonl / summary.json as the other tasks, an adapter that
`StableDiffusionPipeline.load_lora_weights()` loads, and samples/grid.png: base vs adapter, fixed prompts
and seeds. Optional caching encodes latents and captions once, and the summary says what that saved.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peftlab.config import Recipe
from peftlab.data.images import ImageCaptions, ImageStats, build_image_data
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.models import adapt
from peftlab.models import diffusion as sd
from peftlab.models.precision import DTYPES, resolve_precision
from peftlab.report.grids import Grid
from peftlab.runs import RunDir, atomic_dir
from peftlab.tasks.common import resolve_optimizer
from peftlab.watch.console import Progress, say
from peftlab.watch.guard import RunContext, guard_for
from peftlab.watch.memory import current_memory, memory_kind, peak_memory, reset_peak_memory

MODEL_TYPE = "sd-unet"
GRID_FILE = "grid.png"
GIB = 1024**3


@dataclass
class DiffusionSetup:
    parts: sd.SdParts
    data: ImageCaptions
    stats: ImageStats
    context: RunContext
    params: adapt.ParamCount
    unet_facts: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.context.precision]


def build(recipe: Recipe, device: torch.device) -> DiffusionSetup:
    """Load the parts, quantize and prepare the UNet for QLoRA, inject LoRA, read the images."""
    from peft import PeftModel

    precision = resolve_precision(recipe.train.precision, MODEL_TYPE)
    dtype = DTYPES[precision]
    quant = sd.unet_quantization_config(recipe.method.quant, dtype) if recipe.method.name == "qlora" else None
    parts = sd.load_parts(recipe.model, dtype, device, quant)
    data, stats = build_image_data(recipe.data, parts.tokenizer, recipe.seed)
    unet, notes = parts.unet, list(parts.notes)
    loaded, breakdown = sd.param_bytes_by_dtype(unet), sd.param_breakdown(unet)
    if quant is None:
        unet.requires_grad_(False)
    else:
        # No checkpointing flag here: peft's version of it calls get_input_embeddings(), which a UNet lacks;
        # diffusers' own checkpointing (below) is non-reentrant and needs no input grads.
        notes += adapt.prepare_kbit(unet, recipe.method.quant.kbit_prep, gradient_checkpointing=False)
        if recipe.diffusion.cast_4bit_outputs and precision != "fp32":
            hooked = sd.cast_4bit_outputs(unet)
            notes.append(f"{hooked} Linear4bit layers return the autocast dtype ({precision}), as nn.Linear does")
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    adapt.check_targets(unet, recipe.method.lora)
    unet.add_adapter(adapt.lora_config(recipe.method.lora, init_lora_weights="gaussian"))
    if precision == "fp16":  # fp16 LoRA weights underflow in Adam updates (diffusers casts them too)
        from diffusers.training_utils import cast_training_params

        cast_training_params(unet, dtype=torch.float32)
    facts = {
        "params_by_kind": breakdown,  # of the base UNet: what 4-bit can and cannot shrink
        "param_bytes_loaded": loaded,
        "param_bytes_prepared": sd.param_bytes_by_dtype(unet),
        "weight_forecast_gib": sd.weight_forecast(breakdown, 4 if precision == "fp32" else 2),
    }
    attn = type(next(iter(unet.attn_processors.values()))).__name__
    context = RunContext(MODEL_TYPE, precision, attn, recipe.train.lr, recipe.method.name, recipe.method.quant.compute_dtype)
    params = adapt.ParamCount(*PeftModel.get_nb_trainable_parameters(unet))  # peft's count, 4-bit aware
    return DiffusionSetup(parts, data, stats, context, params, facts, notes)


# ---------------------------------------------------------------- the objective


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: Any,
                   snr_gamma: float | None) -> torch.Tensor:
    """MSE on the scheduler's target; with snr_gamma, Min-SNR weighting (Hang et al. 2023) as diffusers does."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (loss * weights).mean()


def noise_prediction_loss(unet: Any, latents: torch.Tensor, states: torch.Tensor, scheduler: Any, recipe: Recipe,
                          kind: str) -> torch.Tensor:
    """Noise the latents at random timesteps, predict the noise (or velocity) from the text states, score it."""
    d = recipe.diffusion
    noise = torch.randn_like(latents)
    if d.noise_offset:
        noise = noise + d.noise_offset * torch.randn(latents.shape[:2] + (1, 1), device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, states, return_dict=False)[0]
    return diffusion_loss(pred, target, timesteps, scheduler, d.snr_gamma)


def prediction_type(recipe: Recipe, scheduler: Any) -> str:
    if recipe.diffusion.prediction_type != "auto":
        scheduler.register_to_config(prediction_type=recipe.diffusion.prediction_type)
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise PeftlabError(f"the model's scheduler predicts '{kind}'; fix: set diffusion.prediction_type to epsilon "
                           "or v_prediction")
    return kind


# ---------------------------------------------------------------- what the UNet is conditioned on


class LatentCache(torch.utils.data.Dataset):
    """VAE latent distributions and text embeddings, encoded once (both orientations when flipping)."""

    def __init__(self, data: ImageCaptions, parts: sd.SdParts, dtype: torch.dtype, batch_size: int) -> None:
        if not data.cfg.center_crop:
            raise PeftlabError("data.images.cache: a cached latent fixes one crop, but center_crop=false asks for a "
                               "random crop per step; fix: data.images.center_crop=true or data.images.cache=false")
        self.flip = data.cfg.random_flip
        self.rng = data.rng
        start = time.perf_counter()
        orientations = (False, True) if self.flip else (False,)
        self.latents = torch.stack([self._encode_images(data, parts, dtype, flip, batch_size) for flip in orientations], 1)
        self.states = torch.cat([_encode_text(parts, ids) for ids in data.input_ids.split(batch_size)]).cpu()
        self.seconds = time.perf_counter() - start
        self.encoded_images = len(data) * len(orientations)

    @staticmethod
    def _encode_images(data: ImageCaptions, parts: sd.SdParts, dtype: torch.dtype, flip: bool, batch_size: int) -> torch.Tensor:
        out = []
        for chunk in torch.arange(len(data)).split(batch_size):
            pixels = torch.stack([data.pixels(int(i), flip, center=True) for i in chunk])
            out.append(_encode_pixels(parts, pixels, dtype, sample=False).cpu())
        return torch.cat(out)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        orientation = int(self.flip and self.rng.random() < 0.5)
        return {"latent_params": self.latents[index, orientation], "states": self.states[index], "index": index}


@torch.no_grad()
def _encode_pixels(parts: sd.SdParts, pixels: torch.Tensor, dtype: torch.dtype, sample: bool = True) -> torch.Tensor:
    """Scaled latents (sample=True), or the latent distribution's parameters for the cache."""
    vae = parts.vae
    dist = vae.encode(pixels.to(vae.device, dtype=dtype)).latent_dist
    return dist.sample() * vae.config.scaling_factor if sample else dist.parameters


@torch.no_grad()
def _encode_text(parts: sd.SdParts, input_ids: torch.Tensor) -> torch.Tensor:
    return parts.text_encoder(input_ids.to(parts.text_encoder.device), return_dict=False)[0]


def _sample_cached(parts: sd.SdParts, latent_params: torch.Tensor, device: torch.device) -> torch.Tensor:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(latent_params.to(device)).sample() * parts.vae.config.scaling_factor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- training


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, str | None]:
    name, note = resolve_optimizer(recipe.train.optimizer)
    kwargs = {"lr": recipe.train.lr, "weight_decay": recipe.train.weight_decay}
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, fused=name.endswith("fused") or None, **kwargs), note
    if name in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, **kwargs), note
    raise PeftlabError(f"train.optimizer '{name}': not available for the diffusion task; use adamw_torch, "
                       "adamw_torch_fused, adamw_8bit or paged_adamw_8bit")


def total_steps(recipe: Recipe, micro_batches_per_epoch: int) -> int:
    t = recipe.train
    return t.max_steps or max(1, math.ceil(t.epochs * micro_batches_per_epoch / t.grad_accum))


def train(recipe: Recipe, run: RunDir, show_progress: bool = True, resume_from: Path | None = None,
          callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Build, train, save the adapter and the sample grid; returns the summary fields. (`callbacks` are
    TrainerCallbacks of the Trainer-based tasks; this loop has no Trainer to call them.)"""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    if resume_from is not None:
        raise PeftlabError("train --resume: diffusion runs write no checkpoints yet; fix: start a new run "
                           "(the adapter of the stopped run is in its adapter/ folder)")
    if callbacks:
        raise PeftlabError("task diffusion: trainer callbacks (sweep pruning) are not supported; fix: run a sweep "
                           "with sweep.pruner=none, or use the sft/classify tasks")
    t = recipe.train
    precision = resolve_precision(t.precision, MODEL_TYPE)
    # accelerate's state is per process and refuses a second precision: a matrix or sweep trains several runs
    # in one process (the HF Trainer resets it the same way).
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=precision if precision in ("bf16", "fp16") else "no",
                              gradient_accumulation_steps=t.grad_accum, cpu=not torch.cuda.is_available())
    set_seed(recipe.seed)
    setup = build(recipe, accelerator.device)
    parts = setup.parts
    kind = prediction_type(recipe, parts.noise_scheduler)
    cache = _build_cache(recipe, setup, accelerator.device)
    dataset = cache or setup.data
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(recipe.seed))
    steps = total_steps(recipe, len(loader))
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * steps)
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    optimizer, note = make_optimizer(recipe, params)
    setup.notes += [note] if note else []
    lr_scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    _announce(recipe, setup, kind, cache)
    run.update_summary(data=setup.stats.as_dict(), precision=precision, attn_implementation=setup.context.attn_implementation,
                       prediction_type=kind, notes=setup.notes, trainable_params=setup.params.trainable,
                       total_params=setup.params.total, unet=setup.unet_facts, max_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(parts.unet, optimizer, loader, lr_scheduler)
    loop = Loop(recipe, run, setup, accelerator, cache is not None, kind)
    reset_peak_memory()
    try:
        summary = loop.run(unet, optimizer, loader, lr_scheduler, params, steps, Progress("train", show_progress))
    except (KeyboardInterrupt, GuardFailure):
        save_adapter(run, accelerator.unwrap_model(unet))  # what was learnt so far stays usable (and inspectable)
        raise
    summary.update(peak_memory())
    summary["latent_cache"] = loop.cache_report(cache)
    unet = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)  # sampling autocasts itself, see sample_grid
    save_adapter(run, unet)
    if cache is not None:
        _place_frozen(parts, accelerator.device)
    if recipe.eval.prompts:
        grid = sample_grid(recipe, setup, unet)
        grid.save(run.samples_path / GRID_FILE)
        say(f"samples: {run.samples_path / GRID_FILE} ({len(grid.rows)} rows x {len(grid.columns)} columns)")
    return summary


def _build_cache(recipe: Recipe, setup: DiffusionSetup, device: torch.device) -> LatentCache | None:
    if not recipe.data.images.cache:
        return None
    cache = LatentCache(setup.data, setup.parts, setup.dtype, recipe.train.batch_size)
    if device.type == "cuda":  # not needed until sampling: give their memory to training
        freed = sum(p.numel() * p.element_size() for m in (setup.parts.vae, setup.parts.text_encoder) for p in m.parameters())
        _place_frozen(setup.parts, torch.device("cpu"))
        torch.cuda.empty_cache()
        setup.notes.append(f"cache: VAE and text encoder moved off the GPU while training (-{freed / GIB:.2f} GiB)")
    return cache


def _place_frozen(parts: sd.SdParts, device: torch.device) -> None:
    parts.vae.to(device)
    parts.text_encoder.to(device)


class Loop:
    """The accumulate / backward / clip / step loop, with the monitor's records every logging step."""

    def __init__(self, recipe: Recipe, run: RunDir, setup: DiffusionSetup, accelerator: Any, cached: bool, kind: str):
        self.recipe, self.folder, self.setup, self.accelerator, self.cached, self.kind = recipe, run, setup, accelerator, cached, kind
        self.guard = guard_for(recipe.watch, setup.context)
        self.micro = self.images = 0
        self.encode_s = 0.0  # time in the VAE + text encoder, measured when not cached
        self.losses: list[torch.Tensor] = []
        self.start = self.last_time = time.perf_counter()
        self.last = (0, 0, 0)  # step, micro-steps, images at the previous record
        self.history: list[dict[str, Any]] = []

    def condition(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, encoder hidden states) of a batch: from the cache, or by running the frozen encoders."""
        parts, device = self.setup.parts, self.accelerator.device
        if self.cached:
            return _sample_cached(parts, batch["latent_params"], device), batch["states"].to(device)
        _sync(device)
        begin = time.perf_counter()
        latents = _encode_pixels(parts, batch["pixel_values"], self.setup.dtype)
        states = _encode_text(parts, batch["input_ids"])
        _sync(device)
        self.encode_s += time.perf_counter() - begin
        return latents, states

    def micro_step(self, unet: Any, batch: dict[str, Any]) -> torch.Tensor:
        latents, states = self.condition(batch)
        return noise_prediction_loss(unet, latents, states, self.setup.parts.noise_scheduler, self.recipe, self.kind)

    def run(self, unet: Any, optimizer: Any, loader: Any, lr_scheduler: Any, params: list, steps: int,
            progress: Progress) -> dict[str, Any]:
        accelerator, t = self.accelerator, self.recipe.train
        unet.train()
        progress.start(total=steps)
        self.start = self.last_time = time.perf_counter()
        step, grad_norm = 0, None
        try:
            for batch in _forever(loader):
                with accelerator.accumulate(unet):
                    loss = self.micro_step(unet, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                self.losses.append(loss.detach())
                self.micro += 1
                self.images += _batch_size(batch)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                progress.advance(step)
                if step % t.logging_steps == 0 or step == steps:
                    self.log(step, grad_norm, lr_scheduler.get_last_lr()[0], len(loader), progress)
                if step >= steps:
                    break
        finally:
            progress.stop()
        return self.summary(step)

    def log(self, step: int, grad_norm: Any, lr: float, per_epoch: int, progress: Progress) -> None:
        now = time.perf_counter()
        dt = max(now - self.last_time, 1e-9)
        window = torch.stack(self.losses[self.last[1]:]).float().mean().item()
        last_step, last_micro, last_images = self.last
        record = {
            "kind": "train", "step": step, "epoch": round(self.micro / per_epoch, 4), "loss": window,
            "grad_norm": None if grad_norm is None else float(grad_norm), "lr": lr, "samples": self.images,
            "samples_per_s": round((self.images - last_images) / dt, 3),
            "it_per_s": round((self.micro - last_micro) / dt, 4),  # micro-steps/s: what the original printed
            "steps_per_s": round((step - last_step) / dt, 4), "micro_steps": self.micro,
            **current_memory(), **peak_memory(), "time": round(now - self.start, 3),
        }
        self.folder.append_metrics(record)
        progress.log(record)
        self.history.append(record)
        self.last_time, self.last = now, (step, self.micro, self.images)
        if self.guard:
            self.guard.check_log(step, record)

    def summary(self, steps: int) -> dict[str, Any]:
        runtime = time.perf_counter() - self.start
        return {
            "runtime_s": round(runtime, 3),
            "steps": steps,
            "micro_steps": self.micro,
            "steps_per_s": round(steps / runtime, 4),
            "it_per_s": round(self.micro / runtime, 4),
            "samples": self.images,
            "samples_per_s": round(self.images / runtime, 3),
            "final_train_loss": self.history[-1]["loss"] if self.history else None,
            "mean_train_loss": torch.stack(self.losses).float().mean().item() if self.losses else None,
            "memory_kind": memory_kind(),
        }

    def cache_report(self, cache: LatentCache | None) -> dict[str, Any]:
        """What caching saves per micro-step: measured encode time vs the step time (one side is an estimate)."""
        runtime = time.perf_counter() - self.start
        step_s = runtime / max(self.micro, 1)
        per_step_images = self.images / max(self.micro, 1)
        if cache is not None:
            encode = cache.seconds / max(cache.encoded_images, 1) * per_step_images
            return {"enabled": True, "build_s": round(cache.seconds, 3), "step_s": round(step_s, 4),
                    "step_s_without_cache_est": round(step_s + encode, 4),
                    "saved_pct_est": round(100 * encode / (step_s + encode), 1)}
        encode = self.encode_s / max(self.micro, 1)
        return {"enabled": False, "encode_s_per_step": round(encode, 4), "step_s": round(step_s, 4),
                "step_s_with_cache_est": round(step_s - encode, 4), "saved_pct_est": round(100 * encode / step_s, 1)}


def _forever(loader: Any) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def _batch_size(batch: dict[str, Any]) -> int:
    return len(batch["index"])


def _announce(recipe: Recipe, setup: DiffusionSetup, kind: str, cache: LatentCache | None) -> None:
    s, facts = setup.stats, setup.unet_facts
    say(f"model {sd.describe_source(recipe.model)} | {recipe.method.name} | {setup.context.precision} | "
        f"{kind} | attention {setup.context.attn_implementation}")
    say(str(setup.params))
    say(f"unet weights by dtype (bytes): loaded {facts['param_bytes_loaded']} -> prepared {facts['param_bytes_prepared']}")
    for note in setup.notes:
        say(f"note: {note}")
    say(f"data: {s.images} images at {recipe.data.images.resolution} px ({s.upscaled} upscaled, smallest side "
        f"{s.min_side_px} px), captions {s.caption_tokens_mean:.0f} tokens mean, {s.captions_truncated} truncated at 77"
        + (f"; cached in {cache.seconds:.1f} s" if cache else ""))


# ---------------------------------------------------------------- outputs


def save_adapter(run: RunDir, unet: Any) -> None:
    """adapter/ in diffusers' LoRA format (what train_text_to_image_lora.py writes), with the LoRA config as
    metadata so that load_lora_weights() restores alpha, not just the rank."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    with atomic_dir(run.adapter_path) as folder:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def render(pipeline: Any, recipe: Recipe, prompt: str, seeds: list[int], steps: int | None = None) -> list[Any]:
    """One image per seed; CPU generators make the same seed give the same noise on every device."""
    res = recipe.data.images.resolution
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline([prompt] * len(seeds), num_inference_steps=steps or recipe.diffusion.sample_steps,
                    guidance_scale=recipe.diffusion.guidance_scale, height=res, width=res, generator=generators).images


def sample_grid(recipe: Recipe, setup: DiffusionSetup, unet: Any) -> Grid:
    """Rows: prompt x seed; columns: the base model (adapter disabled), then the adapter."""
    parts, seeds = setup.parts, recipe.diffusion.sample_seeds
    pipeline = sd.load_pipeline(recipe.model, setup.dtype, unet.device, unet=unet, vae=parts.vae,
                                text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    unet.eval()
    columns: dict[str, list[Any]] = {}
    variants: list[tuple[str, Callable[[], None]]] = [("adapter", unet.enable_adapters)]
    if recipe.eval.compare_base:
        variants.insert(0, ("base", unet.disable_adapters))
    # As in training (and diffusers' log_validation): weights that k-bit prep 'peft' left in fp32 meet bf16 inputs.
    with torch.autocast(unet.device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32):
        for label, switch in variants:
            switch()
            columns[label] = [img for prompt in recipe.eval.prompts for img in render(pipeline, recipe, prompt, seeds)]
    unet.enable_adapters()
    rows = [f"seed {seed}: {prompt}" for prompt in recipe.eval.prompts for seed in seeds]
    cells = [[columns[label][r] for label in columns] for r in range(len(rows))]
    return Grid(rows, list(columns), recipe.data.images.resolution, cells)


def load_for_inference(run: RunDir, recipe: Recipe) -> Any:
    """The base pipeline (full precision, as LoRA adapters are usually served) with the run's adapter loaded."""
    precision = resolve_precision(recipe.train.precision, MODEL_TYPE)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = sd.load_pipeline(recipe.model, DTYPES[precision], device)
    try:
        pipeline.load_lora_weights(str(run.adapter_path))
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise PeftlabError(f"run '{run.path}': its adapter does not load into {recipe.model.source} ({first}); fix: "
                           "the base model changed since training (preset definition or model.revision): retrain, "
                           "or point model.source in config.yaml at the base it was trained on") from None
    # The injected LoRA layers are new modules in training mode (diffusers 0.42): without this, LoRA dropout
    # stays on and every image is drawn with a random mask.
    pipeline.unet.eval()
    return pipeline


def generate_images(pipeline: Any, recipe: Recipe, prompts: list[str], out_dir: Path, seeds: list[int] | None = None,
                    steps: int | None = None) -> list[Path]:
    """PNG files `<prompt-slug>-seed<N>.png` in out_dir, one per prompt and seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = seeds or recipe.diffusion.sample_seeds[:1]
    paths = []
    for prompt in prompts:
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
        for seed, image in zip(seeds, render(pipeline, recipe, prompt, seeds, steps), strict=True):
            path = out_dir / f"{slug}-seed{seed}.png"
            image.save(path)
            paths.append(path)
    return paths


def doctor(recipe: Recipe) -> list[str]:
    """`peftlab doctor` for a diffusion recipe: data, what trains, weight bytes per method, one micro-step."""
    from peftlab.doctor import Checkup

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = build(recipe, device)
    kind = prediction_type(recipe, setup.parts.noise_scheduler)
    _announce(recipe, setup, kind, None)
    say(f"unet weight GiB by method (params by kind {setup.unet_facts['params_by_kind']}): "
        f"{setup.unet_facts['weight_forecast_gib']}")
    s, up = setup.stats, Checkup()
    if s.upscaled:
        say(f"note: {s.upscaled}/{s.images} images are smaller than {recipe.data.images.resolution} px and get upscaled "
            "(soft detail); larger images or a lower data.images.resolution train sharper")
    up.check(s.captions_truncated <= 0.2 * s.images, f"{s.captions_truncated}/{s.images} captions longer than 77 tokens",
             f"{s.captions_truncated}/{s.images} captions are cut at the text encoder's 77 tokens: shorten them")
    unet = setup.parts.unet
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    up.check(bool(trainable) and all(".lora_" in n for n in trainable), f"{len(trainable)} trainable tensors, all LoRA",
             f"trainable tensors outside LoRA or none at all: {[n for n in trainable if '.lora_' not in n][:3]}")
    batch = next(iter(torch.utils.data.DataLoader(setup.data, batch_size=recipe.train.batch_size)))
    latents = _encode_pixels(setup.parts, batch["pixel_values"], setup.dtype)
    states = _encode_text(setup.parts, batch["input_ids"])
    with torch.autocast(device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32):
        loss = noise_prediction_loss(unet, latents, states, setup.parts.noise_scheduler, recipe, kind)
    loss.backward()
    grads = all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)
    up.check(math.isfinite(loss.item()) and loss.item() > 0, f"forward: loss {loss.item():.4f} is finite and > 0",
             f"forward: loss {loss.item()} is not finite and > 0 (precision, learning rate: see the guard's causes)")
    up.check(grads, "backward: all LoRA gradients finite", "backward: non-finite LoRA gradients")
    return up.problems
