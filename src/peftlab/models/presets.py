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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import PeftlabError, did_you_mean
from peftlab.runlock import exclusive
from peftlab.watch.progress import phase

PRESET_SEED = 1234
# What a complete causal-LM preset folder holds: the config and its weights (one file, or shards with an index).
WEIGHTS = ("config.json", "model*.safetensors", "tokenizer.json")

# google/gemma-2-2b config.json, architecture fields.
GEMMA2_2B: dict[str, Any] = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    attention_bias=False, attention_dropout=0.0, sliding_window=4096, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, query_pre_attn_scalar=256, tie_word_embeddings=True, initializer_range=0.02,
)
# Special-token ids of the bundled tokenizers (<|endoftext|> is their BOS, EOS and padding). A preset's config
# takes its tokenizer's ids, with no padding id: transformers zeroes the embedding row of config.pad_token_id
# (nn.Embedding padding_idx: zero at init, never updated), and with tied embeddings a zero row on the EOS
# id pins the EOS logit at 0, so a twin could never learn to stop. Real models pad with an id of their own
# (Gemma-2: <pad> 0, <eos> 1); padding is masked from attention and loss either way.
GPT2_TOKEN_IDS: dict[str, Any] = dict(bos_token_id=50256, eos_token_id=50256, pad_token_id=None)
DOLLY_BPE4K_TOKEN_IDS: dict[str, Any] = dict(bos_token_id=0, eos_token_id=0, pad_token_id=None)
# Same structure, laptop size, with the 4k-token BPE trained on the bundled Dolly text (tools/). A wider
# init than 0.02 so that LoRA alone can move the logits of a random model (at 0.02 the tied embedding
# bounds every logit to about +-1.3 and the loss cannot leave ln(4096)).
TINY_GEMMA2: dict[str, Any] = dict(
    GEMMA2_2B, vocab_size=4096, initializer_range=0.4, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=256, query_pre_attn_scalar=16,
    **DOLLY_BPE4K_TOKEN_IDS,
)
# microsoft/DialoGPT-medium config.json, architecture fields (a GPT-2 medium, 355M). The sequence-classification
# task loads it with AutoModelForSequenceClassification: the transformer weights load, the `score` head is new.
DIALOGPT_MEDIUM: dict[str, Any] = dict(
    model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
    activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
    initializer_range=0.02, **GPT2_TOKEN_IDS,
)
# Same structure at CPU-test size, keeping GPT-2's 50k vocabulary so the real tokenizer's ids fit.
TINY_GPT2: dict[str, Any] = dict(DIALOGPT_MEDIUM, n_embd=64, n_layer=2, n_head=4)


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    description: str
    tokenizer: str  # bundled tokenizer file (the model's own is not available offline)
    native_tokenizer: bool = False  # the bundled file is the model's own tokenizer


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("gemma-2-2b", {**GEMMA2_2B, **GPT2_TOKEN_IDS}, "google/gemma-2-2b architecture (2.6B), random weights",
               "gpt2-tokenizer"),
        Preset("tiny-gemma2", TINY_GEMMA2, "Gemma-2 structure at 0.5M params, random weights, CPU tests",
               "dolly-bpe4k-tokenizer"),
        Preset("dialogpt-medium", DIALOGPT_MEDIUM, "microsoft/DialoGPT-medium architecture (GPT-2, 355M), random weights",
               "gpt2-tokenizer", native_tokenizer=True),
        Preset("tiny-gpt2", TINY_GPT2, "GPT-2 structure at 3.3M params (50k vocab), random weights, CPU tests",
               "gpt2-tokenizer", native_tokenizer=True),
    )
}

# The Gemma tokenizer is not available offline: presets use a bundled byte-level BPE (GPT-2's, or a
# 4k one for tiny twins) whose ids fit the preset vocabulary. Say so wherever a preset is loaded.
def tokenizer_note(name: str) -> str:
    preset = get_preset(name)
    whose = "the model's own" if preset.native_tokenizer else "not the model's own"
    return f"preset tokenizer: bundled byte-level BPE '{preset.tokenizer}', {whose}"


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
    digest = config_digest(preset.config, preset.tokenizer)
    folder = cache_root() / "presets" / f"{name}-{digest}-seed{PRESET_SEED}-{str(dtype).removeprefix('torch.')}"
    if _is_complete(folder, WEIGHTS):
        return folder
    config_kwargs = dict(preset.config)
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)

    def write(tmp: Path) -> None:
        # fork_rng: building the cache must not move the caller's RNG, or a run's LoRA init (and so its losses)
        # would depend on whether the preset was already cached.
        with torch.random.fork_rng(), torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 2.6B random init is minutes on a CPU
            torch.manual_seed(PRESET_SEED)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with saved_on_any_rank(model):
            model.save_pretrained(tmp)
        bundled_tokenizer(preset.tokenizer).save_pretrained(tmp)

    with phase(f"building the preset cache preset:{name} ({folder})"):
        return build_once(folder, write, complete=WEIGHTS)


def config_digest(*parts: Any) -> str:
    """A short stable hash of a preset's definition: a changed config gets a new cache folder."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:8]


def build_once(folder: Path, write: Callable[[Path], None], complete: tuple[str, ...] = ("config.json",)) -> Path:
    """`folder`, filled once by `write(tmp)` in a temporary sibling and renamed into place whole.

    `complete`: files (glob patterns) a finished folder holds. Builders take a lock beside the folder (several ranks,
    or runs of several users of one cache, start at once): one writes, the others wait and reuse its folder. A
    folder missing one of them (left by an older peftlab's race) is set aside and built again; a `write` that
    leaves one out is an error, never a cache entry.
    Errors: PeftlabError when `write` produced an incomplete folder."""
    if _is_complete(folder, complete):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(folder.parent / f".{folder.name}.lock"):
        if _is_complete(folder, complete):  # built by the holder we waited for
            return folder
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            write(tmp)
            if not _is_complete(tmp, complete):
                raise PeftlabError(f"{folder}: the preset's files were not all written (want {', '.join(complete)}; "
                                   f"got {', '.join(sorted(p.name for p in tmp.iterdir())) or 'none'}); fix: report it, "
                                   f"and delete {folder.parent} to rebuild")
            if folder.exists():  # incomplete: move it out of the way in one rename, then drop it
                stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-stale-"))
                folder.rename(stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _is_complete(folder: Path, files: tuple[str, ...]) -> bool:
    return folder.is_dir() and all(any(folder.glob(pattern)) for pattern in files)


@contextmanager
def saved_on_any_rank(*models: Any) -> Iterator[None]:
    """transformers writes weights on global rank 0 only once a process group exists (`should_save_on_this_rank`):
    a cache built by another rank (the first rank of a second machine, or rank 1 winning the lock) would hold a
    config without weights. A preset is the same on every rank, so whoever builds it writes all of it."""
    for model in models:
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        for model in models:
            vars(model).pop("should_save_on_this_rank", None)


def bundled_tokenizer(name: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = resources.files("peftlab.data") / "bundled" / f"{name}.json.gz"
    with gzip.open(str(data), "rt", encoding="utf-8") as fh:
        tok = Tokenizer.from_str(fh.read())
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos, unk_token=eos)
