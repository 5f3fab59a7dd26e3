"""The fast training engine for decoder-LM tasks (sft, classify): the recipe's optimizer steps executed as
packed, padding-free token rows with per-document flex-attention masks, a chunked LM loss, fused AdamW and
regional torch.compile. Same math as the hf engine (tests/test_fast_*.py hold the equalities)."""

from peftlab.engines.fast.attention import ATTENTION_NAME, block_masks, document_mask_mod, use_packed_attention
from peftlab.engines.fast.loop import FastLoop, LoopResult, LoopSettings, StepHooks
from peftlab.engines.fast.loss import chunked_lm_loss, classification_loss
from peftlab.engines.fast.model import FastModel
from peftlab.engines.fast.packing import PackedBatch, pack_step, packed_steps, step_rows, total_steps
from peftlab.engines.fast.planner import Plan, plan
from peftlab.engines.fast.trainer import FastReport, FastTrainer, unsupported

__all__ = [
    "ATTENTION_NAME", "FastLoop", "FastModel", "FastReport", "FastTrainer", "LoopResult", "LoopSettings",
    "PackedBatch", "Plan", "StepHooks", "block_masks", "chunked_lm_loss", "classification_loss",
    "document_mask_mod", "pack_step", "packed_steps", "plan", "step_rows", "total_steps", "unsupported",
    "use_packed_attention",
]
