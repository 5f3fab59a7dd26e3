"""Stable Diffusion parts: where they come from (hub id, diffusers-layout folder, random-init preset), the UNet's
4-bit config, and the parameter accounting behind the LoRA-vs-QLoRA memory story (docs/diffusion-qlora-memory.md).

The presets are written once as a normal diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json), so presets and real checkpoints share one loading path, quantization included.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import ModelConfig, QuantSettings
from peftlab.errors import PeftlabError, did_you_mean
from peftlab.models import presets
from peftlab.models.adapt import bnb_quantization_config
from peftlab.models.loader import offline_error

CLIP_MAX_LENGTH = 77

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
# vae/config.json
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# text_encoder/config.json: the CLIP ViT-L/14 text tower (the vocabulary size follows the bundled tokenizer)
SD15_TEXT: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
# scheduler/scheduler_config.json: the pipeline samples with PNDM; training reads the same config into DDPM.
SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
)
# Every structural feature of SD 1.5 (4 levels, cross-attention, GEGLU, 2 layers per block) at CPU size. Linear
# widths stay multiples of 64: bitsandbytes' CPU inference path for 4-bit layers needs in_features >= its
# 64-weight quantization block (a 32-wide layer fails there).
TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(64, 64, 64, 64), cross_attention_dim=64,
                 norm_num_groups=8, attention_head_dim=2)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=64)
TINY_TEXT = dict(SD15_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=64)


@dataclass(frozen=True)
class DiffusionPreset:
    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    description: str
    tokenizer: str  # bundled byte-level BPE: CLIP's own tokenizer files are not available offline


DIFFUSION_PRESETS: dict[str, DiffusionPreset] = {
    p.name: p
    for p in (
        DiffusionPreset("sd15", SD15_UNET, SD15_VAE, SD15_TEXT,
                        "runwayml/stable-diffusion-v1-5 architecture (UNet 860M), random weights", "gpt2-tokenizer"),
        DiffusionPreset("tiny-sd", TINY_UNET, TINY_VAE, TINY_TEXT,
                        "SD 1.5 structure at 4.3M UNet params, random weights, CPU tests", "dolly-bpe4k-tokenizer"),
    )
}


def get_preset(name: str) -> DiffusionPreset:
    if name not in DIFFUSION_PRESETS:
        raise PeftlabError(f"model.source 'preset:{name}': unknown diffusion preset; {did_you_mean(name, DIFFUSION_PRESETS)}")
    return DIFFUSION_PRESETS[name]


def tokenizer_note(name: str) -> str:
    preset = get_preset(name)
    return (f"preset tokenizer: bundled byte-level BPE '{preset.tokenizer}' shaped like CLIP's (77 tokens, "
            "<bos> text <eos>), not CLIP's own; the text encoder's vocabulary follows it")


def clip_like_tokenizer(name: str) -> Any:
    """A bundled BPE that tokenizes like CLIPTokenizer does for SD: <|endoftext|> around the text, 77 tokens."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = presets.bundled_tokenizer(name)
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{eos} $A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)])
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def preset_folder(name: str) -> Path:
    """The preset as a diffusers folder in fp32 (like the published checkpoint), written once and reused."""
    preset = get_preset(name)
    digest = presets.config_digest(preset.unet, preset.vae, preset.text, preset.tokenizer, SD15_SCHEDULER)
    folder = presets.cache_root() / "presets" / f"{preset.name}-{digest}-seed{presets.PRESET_SEED}"
    complete = ("model_index.json", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors")
    return presets.build_once(folder, lambda tmp: _write_preset(preset, tmp), complete)


def _write_preset(preset: DiffusionPreset, folder: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_like_tokenizer(preset.tokenizer)
    text = CLIPTextConfig(**preset.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    # fork_rng: writing the preset must not move the caller's RNG, or a run's LoRA init and noise (so its losses)
    # would depend on whether the preset was already cached (as in models/presets.py).
    with torch.random.fork_rng(), torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1B params: slow on a CPU
        torch.manual_seed(presets.PRESET_SEED)
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**preset.vae), text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
            unet=UNet2DConditionModel(**preset.unet), scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    with presets.saved_on_any_rank(pipeline.text_encoder):
        pipeline.save_pretrained(folder)


def describe_source(cfg: ModelConfig) -> str:
    if cfg.parsed.preset:
        return f"{cfg.source} ({get_preset(cfg.parsed.preset).description})"
    return cfg.source


def location(cfg: ModelConfig) -> str:
    """A diffusers-layout folder or a hub id for `cfg.source`."""
    if cfg.parsed.preset:
        return str(preset_folder(cfg.parsed.preset))
    path = Path(cfg.source)
    if path.exists() and not (path / "unet" / "config.json").is_file():
        raise PeftlabError(
            f"model.source '{cfg.source}': not a diffusers-layout folder (no unet/config.json); fix: point it at a "
            "folder saved by `pipeline.save_pretrained()` or downloaded with `hf download runwayml/stable-diffusion-v1-5`"
        )
    return cfg.source


def _from_pretrained(loader: Any, cfg: ModelConfig, where: str, subfolder: str, **kwargs: Any) -> Any:
    """One part of a pipeline; 'not cached and no hub' becomes a one-line answer."""
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        return loader.from_pretrained(where, subfolder=subfolder, **kwargs)
    except OSError as exc:
        if os.path.isdir(where):
            raise PeftlabError(f"model.source '{cfg.source}': {subfolder}/ is not loadable ({str(exc).splitlines()[0]})") from None
        raise offline_error(cfg, "use preset:sd15 / preset:tiny-sd") from None


@dataclass
class SdParts:
    """What the training loop needs: the UNet (maybe 4-bit), frozen VAE + text encoder, tokenizer, noise schedule."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    notes: list[str] = field(default_factory=list)


def load_parts(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, quant: Any | None = None) -> SdParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    where = location(cfg)
    unet_kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        unet_kwargs["quantization_config"] = quant
        if device.type == "cpu":
            unet_kwargs["device_map"] = {"": "cpu"}
    with allow_cpu_4bit() if quant is not None and device.type == "cpu" else contextlib.nullcontext(), no_progress_bars():
        unet = _from_pretrained(UNet2DConditionModel, cfg, where, "unet", **unet_kwargs)
    vae = _from_pretrained(AutoencoderKL, cfg, where, "vae", dtype=dtype)
    text_encoder = _from_pretrained(CLIPTextModel, cfg, where, "text_encoder", dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, cfg, where, "tokenizer")
    noise_scheduler = _from_pretrained(DDPMScheduler, cfg, where, "scheduler")
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.to(device)
    if quant is None:
        unet.to(device)
    notes = [tokenizer_note(cfg.parsed.preset)] if cfg.parsed.preset else []
    return SdParts(unet, vae, text_encoder, tokenizer, noise_scheduler, notes)


def unet_quantization_config(quant: QuantSettings, compute_dtype: torch.dtype) -> Any:
    """diffusers' own BitsAndBytesConfig (its UNet loader needs it), with the same fields as the LLM path."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig.from_dict(bnb_quantization_config(quant, compute_dtype).to_dict())


@contextlib.contextmanager
def allow_cpu_4bit() -> Iterator[None]:
    """bitsandbytes >= 0.49 runs 4-bit layers on CPU, but diffusers 0.42's quantizer still refuses to load without
    an accelerator (a GPU check in validate_environment). CPU only: on a GPU the stock check runs."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    original = BnB4BitDiffusersQuantizer.validate_environment
    BnB4BitDiffusersQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        BnB4BitDiffusersQuantizer.validate_environment = original


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """diffusers' "Loading pipeline components..." bars, off while loading (then as they were)."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()


def load_pipeline(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, **components: Any) -> Any:
    """A StableDiffusionPipeline from the source (given `components` replace the stored ones), no safety checker."""
    from diffusers import StableDiffusionPipeline

    where = location(cfg)
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    try:
        with no_progress_bars():
            pipeline = StableDiffusionPipeline.from_pretrained(
                where, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                **components, **kwargs)
    except OSError as exc:
        raise PeftlabError(f"model.source '{cfg.source}': the pipeline is not loadable ({str(exc).splitlines()[0]})") from None
    if not components:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ------------------------------------------------------------ memory accounting (why QLoRA can cost more)

NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def param_kind(module: nn.Module) -> str:
    """What bitsandbytes does with a layer's weights: only nn.Linear (and its 4-bit form) is quantized."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, NORMS):
        return "norm"
    return "other"


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameter count per layer kind (4-bit weights counted as the numbers they stand for, as peft does)."""
    counts: Counter[str] = Counter()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            counts[param_kind(module)] += param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
    return dict(counts)


def param_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    out: Counter[str] = Counter()
    for param in model.parameters():
        out[str(param.dtype).removeprefix("torch.")] += param.numel() * param.element_size()
    return dict(out)


def meta_unet(config: dict[str, Any]) -> nn.Module:
    """A UNet with this config on the meta device: counts without allocating 3.4 GB."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**config)


def weight_forecast(breakdown: dict[str, int], dtype_bytes: int = 2) -> dict[str, float]:
    """UNet weight GiB for LoRA (all weights in the training dtype), QLoRA with dtypes kept ('lean'), and QLoRA
    after peft's fp32 upcast. nf4 packs 2 weights per byte; its absmax scales (not parameters) come on top."""
    linear = breakdown.get("linear", 0)
    rest = sum(breakdown.values()) - linear
    gib = 1024**3
    four_bit = linear * 0.5
    return {
        "lora_gib": round((linear + rest) * dtype_bytes / gib, 3),
        "qlora_lean_gib": round((four_bit + rest * dtype_bytes) / gib, 3),
        "qlora_peft_upcast_gib": round((four_bit + rest * 4) / gib, 3),
    }


def cast_4bit_outputs(model: nn.Module) -> int:
    """Make bitsandbytes' Linear4bit return the autocast dtype, as nn.Linear does under autocast.

    Linear4bit casts its output back to its *input* dtype. Under CUDA autocast the norms before the attention
    projections and the GEGLU feed-forward emit fp32, so with a 4-bit UNet the feed-forward (GEGLU gate, gelu,
    product) runs and is saved for backward in fp32 instead of bf16: ~0.26 GiB more activations per 512 px image
    on SD 1.5, more than 4-bit saves on weights. Returns the number of layers hooked."""
    import bitsandbytes as bnb

    def to_autocast_dtype(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        device = output.device.type
        if torch.is_autocast_enabled(device) and output.is_floating_point():
            return output.to(torch.get_autocast_dtype(device))
        return output

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.register_forward_hook(to_autocast_dtype)
    return len(layers)


def settle_4bit_biases(model: nn.Module) -> int:
    """Cast every Linear4bit bias to its layer's compute dtype now, as bitsandbytes' first forward would.

    Linear4bit.forward casts a bias of another dtype in place (`bias.data = bias.data.to(...)`), which dynamo cannot
    trace: under torch.compile each such layer is a graph break. k-bit prep 'peft' upcasts these biases to fp32, so
    a compiled bf16 UNet then broke at every biased 4-bit layer (60 breaks, 97 graphs on the tiny twin). The values
    are those the first forward would have set. Returns the number of biases cast."""
    import bitsandbytes as bnb

    cast = 0
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit) and layer.bias is not None and layer.compute_dtype is not None \
                and layer.bias.dtype != layer.compute_dtype:
            layer.bias.data = layer.bias.data.to(layer.compute_dtype)
            cast += 1
    return cast


def dequantize_unet(unet: nn.Module) -> nn.Module:
    """The 4-bit UNet with plain nn.Linear layers holding its dequantised weights, and no quantization_config left in
    its config (diffusers' `dequantize()` keeps it, so the saved model would be quantized again on load). On a CPU we
    call diffusers' replacement directly: its `dequantize()` first moves a CPU model to CUDA, and bitsandbytes
    dequantises on the CPU as well."""
    if torch.cuda.is_available():
        unet = unet.dequantize()
    else:
        from diffusers.quantizers.bitsandbytes.utils import dequantize_and_replace

        quantizer = unet.hf_quantizer
        unet = dequantize_and_replace(unet, quantizer.modules_to_not_convert,
                                      quantization_config=quantizer.quantization_config)
        del unet.hf_quantizer
        unet.is_quantized = False
    # register_to_config can add or replace a key but not remove one, and a None is still written (then read back
    # as "pre-quantized"): rebuild the frozen config without it.
    from diffusers.configuration_utils import FrozenDict

    unet._internal_dict = FrozenDict({k: v for k, v in unet.config.items() if k != "quantization_config"})
    return unet
