"""Where weights come from: one loader for hub ids, local folders, GGUF files and random-init presets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from peftlab.config import ModelConfig
from peftlab.errors import PeftlabError
from peftlab.models import presets

# Gemma-2 caps attention logits (tanh softcapping). eager and flex apply it, SDPA silently does not
# (transformers PR #32865), and SDPA with padding gave NaN rows (transformers#32390).
SOFTCAP_FAMILIES = ("gemma2",)


def describe_source(cfg: ModelConfig) -> str:
    if cfg.source.startswith("preset:"):
        return f"{cfg.source} ({presets.get_preset(cfg.source.removeprefix('preset:')).description})"
    return cfg.source + (f" [{cfg.gguf_file}]" if cfg.gguf_file else "")


def _location(cfg: ModelConfig, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs) for any kind of source."""
    if cfg.source.startswith("preset:"):
        return str(presets.preset_checkpoint(cfg.source.removeprefix("preset:"), dtype)), {}
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.source.endswith(".gguf"):
        path = Path(cfg.source)
        if not path.is_file():
            raise PeftlabError(f"model.source: GGUF file '{cfg.source}' not found; fix: check the path")
        return str(path.parent), {**kwargs, "gguf_file": path.name}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    return cfg.source, kwargs


def _from_pretrained(loader: Any, cfg: ModelConfig, location: str, **kwargs: Any) -> Any:
    """Call a transformers loader, turning 'not cached and no hub' into a one-line answer."""
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError as exc:
        if os.path.isdir(location):
            raise PeftlabError(f"model.source '{cfg.source}': local folder is not loadable ({str(exc).splitlines()[0]})") from None
        raise PeftlabError(
            f"model.source '{cfg.source}': not in the local Hugging Face cache and the hub is unreachable "
            f"(offline={os.environ.get('HF_HUB_OFFLINE', '0')}); fix: download it where there is network "
            "(`hf download ID`) and point model.source at that folder, use a .gguf file, or a random-init "
            "preset such as preset:gemma-2-2b / preset:tiny-gemma2"
        ) from None


def load_model_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    if cfg.source.startswith("preset:"):
        preset = presets.get_preset(cfg.source.removeprefix("preset:"))
        kwargs = dict(preset.config)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    location, kwargs = _location(cfg, torch.float32)
    return _from_pretrained(AutoConfig, cfg, location, **kwargs)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    if cfg.tokenizer is None and cfg.source.startswith("preset:"):
        tokenizer = presets.bundled_tokenizer(presets.get_preset(cfg.source.removeprefix("preset:")).tokenizer)
    else:
        source = ModelConfig(source=cfg.tokenizer) if cfg.tokenizer else cfg
        location, kwargs = _location(source, torch.float32)
        tokenizer = _from_pretrained(AutoTokenizer, source, location, **kwargs)
    if tokenizer.pad_token is None:  # decoder LMs often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(requested: str, model_type: str) -> str:
    if model_type in SOFTCAP_FAMILIES:
        if requested == "sdpa":
            raise PeftlabError(
                f"model.attn_implementation: sdpa drops {model_type}'s attention logit softcapping (and gave NaN "
                "with padding); fix: use eager, flex_attention or flash_attention_2 (flash-attn >= 2.6)"
            )
        return "eager" if requested == "auto" else requested
    return "sdpa" if requested == "auto" else requested


def load_causal_lm(
    cfg: ModelConfig, dtype: torch.dtype, attn_implementation: str, quantization_config: Any | None = None
) -> Any:
    from transformers import AutoModelForCausalLM

    location, kwargs = _location(cfg, dtype)
    kwargs.update(dtype=dtype, attn_implementation=attn_implementation)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return _from_pretrained(AutoModelForCausalLM, cfg, location, **kwargs)
