"""A GGUF file converted once into an ordinary checkpoint folder (config, tokenizer, dequantised safetensors).

transformers reads a GGUF by rebuilding its tokenizer from the GGUF vocabulary (Gemma 3's 262k entries: ~20 s of
CPU) and dequantising every tensor, on every load. peftlab does that once per file and caches the result under
`$PEFTLAB_CACHE/gguf/<stem>-<sha256 prefix>/`; every later load (tokenizer, config, LoRA or QLoRA model) is the
normal `from_pretrained(folder)` path. The key is the file's content (sha256), so a changed or replaced file
gets a new folder; the digest is computed once per (path, size, mtime) in a process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.models.presets import build_once, cache_root
from peftlab.watch.progress import phase

Converter = Callable[[Path, Path], None]  # (gguf file, empty folder to fill)
CONVERTED_FILES = ("config.json", "*.safetensors", "tokenizer_config.json")  # what a whole conversion holds


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def cache_folder(path: Path) -> Path:
    """Where the converted copy of GGUF `path` lives (it may not exist yet)."""
    return cache_root() / "gguf" / f"{path.stem}-{file_sha256(path)[:16]}"


def converted(path: Path, convert: Converter | None = None) -> Path:
    """The checkpoint folder for GGUF file `path`, converted by `convert` (default: transformers' GGUF reader)
    the first time, into a temporary sibling renamed into place: a crash leaves no half folder to reuse."""
    def build(tmp: Path) -> None:
        with phase(f"converting {path.name} once (tokenizer + dequantised weights) into {tmp.parent}"):
            (convert or convert_with_transformers)(path, tmp)

    return build_once(cache_folder(path), build, complete=CONVERTED_FILES)


def convert_with_transformers(path: Path, out: Path) -> None:
    """Tokenizer and fp32 weights as transformers dequantises them (fp32: the dequantised values exactly)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    with quiet_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    forget_gguf_quantizer(model)
    model.save_pretrained(out)


@contextlib.contextmanager
def quiet_gguf_reader() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar, which ignores `disable_progress_bar()`: carriage returns
    in a piped log, beside our phase line that says the same. Off while converting, then as it was."""
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def forget_gguf_quantizer(model: Any) -> None:
    """transformers dequantizes GGUF tensors into ordinary float layers on load but leaves a GGUF quantizer
    attached, and the Trainer refuses to train a model "quantized with GGUF". The weights are plain
    floats: drop the marker so LoRA (and QLoRA, which re-quantizes) can train them."""
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:  # weights really left in GGUF blocks: training them is impossible
        raise PeftlabError(f"model.source: {len(packed)} weights stayed in GGUF blocks (e.g. {packed[0]}); fix: "
                           "use a transformers version that dequantizes GGUF on load")
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
