"""The model side of a fast step: backbone, head and the loss of one packed micro-batch.

Works on the peft model the task built (LoRA already injected), without copying weights: the backbone is the
transformers decoder inside it (Gemma2Model, Gemma3TextModel, GPT2Model), called with packed input ids,
per-document position ids and block masks; the head is the frozen LM head (sft) or the trained `score`
head (classify, peft's modules_to_save copy). Adapters therefore stay peft-format: save_pretrained of the
same peft model writes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from peftlab.engines.fast import attention
from peftlab.engines.fast.loss import DEFAULT_CHUNK, ChunkCore, chunked_lm_loss, classification_loss
from peftlab.engines.fast.packing import PackedBatch, Task

SUPPORTED_FAMILIES = ("gemma2", "gemma3_text", "gemma3", "gpt2")


class FastModel:
    """A peft model prepared for packed micro-batches.

    peft_model: a PeftModel around a transformers CausalLM (task "sft") or SequenceClassification model
    ("classify"). precision: "bf16" (autocast on the model's device) or "fp32". ce_chunk: tokens per chunk of the
    LM loss. Errors: ValueError for a model family or precision the fast engine does not support.
    """

    def __init__(self, peft_model: Any, task: Task, precision: str = "fp32", ce_chunk: int = DEFAULT_CHUNK,
                 mask_builder: Callable[..., Any] | None = None) -> None:
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"the fast engine runs bf16 or fp32, not {precision} (fp16 needs a grad scaler)")
        self.peft_model = peft_model
        self.task = task
        self.hf_model = peft_model.get_base_model()
        self.config = self.hf_model.config
        if self.config.model_type not in SUPPORTED_FAMILIES:
            raise ValueError(f"the fast engine has no masks for model family '{self.config.model_type}'")
        self.backbone = getattr(self.hf_model, self.hf_model.base_model_prefix)
        self.precision = precision
        self.ce_chunk = ce_chunk
        self.ce_core: ChunkCore | None = None  # compile.compile_loss_core sets a compiled one
        self.mask_builder = mask_builder or attention.create_block_mask
        self._masks: dict[int, attention.PackedMasks] = {}  # per token budget
        self.original_attention = self.config._attn_implementation
        self.use_packed_attention()

    def use_packed_attention(self) -> None:
        attention.use_packed_attention(self.peft_model)

    def set_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing of the decoder layers (transformers' own, non-reentrant)."""
        if enabled:
            self.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.hf_model.gradient_checkpointing_disable()

    def restore_attention(self) -> None:
        """Give the model back its own attention (evaluation, generation and the Trainer use padded batches)."""
        self.hf_model.set_attn_implementation(self.original_attention)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        """The repeated blocks (what regional compilation compiles once)."""
        return self.backbone.layers if hasattr(self.backbone, "layers") else self.backbone.h

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":  # no weight-cast cache: a CUDA graph capture would keep its casts (graphs.py)
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """[T, H] last hidden states of the packed row (batch already on the device)."""
        if batch.budget not in self._masks:
            self._masks[batch.budget] = attention.PackedMasks(self.config, batch.budget, self.device,
                                                              builder=self.mask_builder)
        masks = self._masks[batch.budget](batch.document_ids)
        with self._autocast():
            out = self.backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                                **attention.mask_arguments(self.config, masks))
        return out.last_hidden_state[0]

    def loss(self, batch: PackedBatch) -> torch.Tensor:
        """Weighted loss of one micro-batch (fp32 scalar); summed over the step's micro-batches it is the step's
        loss in the hf engine's normalisation (packing.py)."""
        hidden = self.hidden_states(batch)
        with self._autocast():
            if self.task == "classify":
                return classification_loss(hidden, self.hf_model.score, batch.pooled_positions, batch.class_labels,
                                           batch.class_weights)
            head = self.hf_model.get_output_embeddings().weight
            return chunked_lm_loss(hidden, head, batch.targets, batch.target_weights,
                                   getattr(self.config, "final_logit_softcapping", None), self.ce_chunk, self.ce_core)
