"""Random-init presets: exact published architectures and tiny twins, for machines without a model hub.

Throughput and memory do not depend on weight values, so `preset:gemma-2-2b` benchmarks the real
architecture; the tiny twins keep every structural feature (softcapping, GQA, tied embeddings) at a
size that trains on a laptop CPU. Preset weights are drawn from a fixed seed and written once as a
normal checkpoint, so QLoRA goes through the ordinary `from_pretrained(quantization_config=...)` path
and `peftlab generate` reloads the exact base a run trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import PeftlabError, did_you_mean

PRESET_SEED = 1234

# google/gemma-2-2b config.json, architecture fields.
GEMMA2_2B: dict[str, Any] = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    attention_bias=False, attention_dropout=0.0, sliding_window=4096, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, query_pre_attn_scalar=256, tie_word_embeddings=True, initializer_range=0.02,
)
# Same structure, laptop size, with the 4k-token BPE trained on the bundled Dolly text (tools/). A wider
# init than 0.02 so that LoRA alone can move the logits of a random model (at 0.02 the tied embedding
# bounds every logit to about +-1.3 and the loss cannot leave ln(4096)).
TINY_GEMMA2: dict[str, Any] = dict(
    GEMMA2_2B, vocab_size=4096, initializer_range=0.4, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=256, query_pre_attn_scalar=16,
)


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    description: str
    tokenizer: str  # bundled tokenizer file (the model's own is not available offline)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("gemma-2-2b", GEMMA2_2B, "google/gemma-2-2b architecture (2.6B), random weights", "gpt2-tokenizer"),
        Preset("tiny-gemma2", TINY_GEMMA2, "Gemma-2 structure at 0.5M params, random weights, CPU tests",
               "dolly-bpe4k-tokenizer"),
    )
}

# The Gemma tokenizer is not available offline: presets use a bundled byte-level BPE (GPT-2's, or a
# 4k one for tiny twins) whose ids fit the preset vocabulary. Say so wherever a preset is loaded.
def tokenizer_note(name: str) -> str:
    return f"preset tokenizer: bundled byte-level BPE '{get_preset(name).tokenizer}', not the model's own"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PeftlabError(f"model.source 'preset:{name}': unknown preset; {did_you_mean(name, PRESETS)}")
    return PRESETS[name]


def cache_root() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def preset_checkpoint(name: str, dtype: torch.dtype) -> Path:
    """Folder holding the preset's random weights in `dtype`, written once (atomically) and reused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = get_preset(name)
    digest = hashlib.sha256(json.dumps([preset.config, preset.tokenizer], sort_keys=True).encode()).hexdigest()[:8]
    folder = cache_root() / "presets" / f"{name}-{digest}-seed{PRESET_SEED}-{str(dtype).removeprefix('torch.')}"
    if (folder / "config.json").exists():
        return folder
    config_kwargs = dict(preset.config)
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
    torch.manual_seed(PRESET_SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 2.6B random init is minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    model.save_pretrained(tmp)
    bundled_tokenizer(preset.tokenizer).save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def bundled_tokenizer(name: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = resources.files("peftlab.data") / "bundled" / f"{name}.json.gz"
    with gzip.open(str(data), "rt", encoding="utf-8") as fh:
        tok = Tokenizer.from_str(fh.read())
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos, unk_token=eos)
