"""An adapter merged into its base: what `peftlab export` writes for the language-model tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def merged_model(base: Any, adapter: Path) -> Any:
    """The adapter's LoRA (and trained head, peft's modules_to_save) merged into `base`. A 4-bit base is dequantised
    first (transformers' `dequantize`), so the merged weights are those the adapter was trained against, in the
    compute dtype; merging into the 4-bit layers would re-quantise them and change the function."""
    from peft import PeftModel

    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize()
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
