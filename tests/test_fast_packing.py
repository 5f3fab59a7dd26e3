"""Fast engine, packing and attention: packed rows give exactly the per-token losses of the unpacked rows.

Per-token cross-entropies of every document, packed into one row with other documents (per-document block
masks, restarting positions, shifted targets) vs the same document alone through the model's own attention,
in fp32: within 1e-5. Three families: tiny-gemma2 (logit softcaps, sliding layers; also with a window smaller
than the documents), tiny-gpt2 (learned positions) and a random Gemma 3 text model with sliding layers. Both
attention paths are checked: flex (forward, no grad) and the dense evaluation of the same masks (with grad,
which the CPU trains with), including the LoRA gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from peftlab.config import LoraSettings, ModelConfig
from peftlab.engines.fast import FastModel, pack_step
from peftlab.engines.fast.packing import IGNORE_INDEX, PAD_DOCUMENT, shifted_targets
from peftlab.errors import PeftlabError
from peftlab.models import adapt, loader

LENGTHS = [37, 5, 60, 25, 2, 31, 1, 19]
TOL = 1e-5


def rows_for(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3:]})  # a masked prompt
    return rows


def with_active_lora(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA B starts at zero; give it values so the adapters change the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def preset_lm(name: str, **config_changes) -> torch.nn.Module:
    model = loader.load_causal_lm(ModelConfig(source=f"preset:{name}"), torch.float32, "eager")
    if config_changes:  # same weights, another window: rebuild from the changed config
        from transformers import AutoModelForCausalLM

        config = model.config
        for key, value in config_changes.items():
            setattr(config, key, value)
        state = model.state_dict()
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model.load_state_dict(state)
    targets = ["c_attn", "c_proj"] if model.config.model_type == "gpt2" else LoraSettings().target_modules
    return with_active_lora(adapt.apply_lora(model, LoraSettings(dropout=0.0, target_modules=targets)))


def gemma3_lm() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              initializer_range=0.2, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config)
    return with_active_lora(adapt.apply_lora(model, LoraSettings(dropout=0.0)))


MODELS = {
    "tiny-gemma2": lambda: preset_lm("tiny-gemma2"),
    "tiny-gemma2-window16": lambda: preset_lm("tiny-gemma2", sliding_window=16),
    "tiny-gpt2": lambda: preset_lm("tiny-gpt2"),
    "gemma3-sliding8": gemma3_lm,
}


def unpacked_token_losses(model, row) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float()
    return F.cross_entropy(logits, torch.tensor(shifted_targets(row["labels"])), reduction="none",
                           ignore_index=IGNORE_INDEX)


def packed_token_losses(fast: FastModel, batch) -> torch.Tensor:
    hidden = fast.hidden_states(batch)
    logits = fast.hf_model.lm_head(hidden).float()
    cap = getattr(fast.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, batch.targets, reduction="none", ignore_index=IGNORE_INDEX)


def per_document(batch, losses) -> list[torch.Tensor]:
    return [losses[batch.document_ids == d] for d in range(batch.documents)]


def lora_grads(model) -> torch.Tensor:
    grads = torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_per_token_losses_equal_unpacked(name):
    model = MODELS[name]()
    model.eval()  # dropout off: both sides must see the same function
    rows = rows_for(model.config.vocab_size)
    # reference: each document alone, the model's own (eager) attention and full logits
    reference, total = [], torch.zeros(())
    for row in rows:
        losses = unpacked_token_losses(model, row)
        reference.append(losses.detach())
        total = total + losses.sum()
    total.backward()
    reference_grads = lora_grads(model)

    fast = FastModel(model, "sft")
    batches = pack_step(rows, 128, "sft", batch_size=2)
    assert len(batches) == 2 and sum(b.documents for b in batches) == len(rows)
    packed: dict[int, torch.Tensor] = {}
    for grad_enabled in (False, True):  # flex forward, then the dense evaluation of the same masks + backward
        total = torch.zeros(())
        with torch.set_grad_enabled(grad_enabled), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex's "unfused CPU path" notice
            got = []
            for batch in batches:
                losses = packed_token_losses(fast, batch)
                got += [(tuple(batch.input_ids[0][batch.document_ids == d].tolist()), part)
                        for d, part in enumerate(per_document(batch, losses))]
                total = total + losses.sum()
        for ids, part in got:
            packed[ids] = part.detach()
        for row, ref in zip(rows, reference, strict=True):
            assert torch.allclose(packed[tuple(row["input_ids"])], ref, atol=TOL, rtol=0), (name, grad_enabled)
    total.backward()
    grads = lora_grads(model)
    assert ((grads - reference_grads).norm() / reference_grads.norm()) < TOL


def test_document_isolation_matters():
    """Negative control: with one document id for the whole row (plain causal attention across documents), the
    losses of the later documents change: the equality above is not vacuous."""
    model = MODELS["tiny-gemma2"]()
    model.eval()
    rows = rows_for(model.config.vocab_size, [20, 20])
    fast = FastModel(model, "sft")
    (batch,) = pack_step(rows, 64, "sft", batch_size=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        isolated = packed_token_losses(fast, batch)
        batch.document_ids[batch.document_ids >= 0] = 0
        batch.position_ids[0, :40] = torch.arange(40)
        mixed = packed_token_losses(fast, batch)
    second = slice(20, 39)
    assert (isolated[second] - mixed[second]).abs().max() > 1e-2


def test_pack_step_layout():
    rows = rows_for(100, [5, 3, 4])
    (batch,) = pack_step(rows, 16, "sft", batch_size=3)
    assert batch.input_ids.shape == (1, 16) and batch.tokens == 12 and batch.sum_sq == 25 + 9 + 16
    docs = batch.document_ids.tolist()
    assert docs[12:] == [PAD_DOCUMENT] * 4  # padding only as a trailing segment
    assert batch.target_weights[12:].eq(0).all() and batch.targets[12:].eq(IGNORE_INDEX).all()
    for d, row in enumerate(rows):
        at = docs.index(d)
        n = len(row["input_ids"])
        assert batch.position_ids[0, at:at + n].tolist() == list(range(n))  # positions restart per document
        assert batch.targets[at:at + n].tolist() == row["labels"][1:] + [IGNORE_INDEX]  # never crosses a document
    trained = sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows)
    assert batch.trained == trained
    assert batch.target_weights.sum().item() == pytest.approx(1.0)  # 1 / trained tokens of the step, per token


def test_sft_weights_span_the_whole_step():
    rows = rows_for(100, [30, 30, 30])
    batches = pack_step(rows, 32, "sft", batch_size=1)
    assert len(batches) == 3  # one document per row: they do not fit together
    assert sum(b.target_weights.sum().item() for b in batches) == pytest.approx(1.0)


def test_classify_pools_last_non_pad_and_weights_per_micro_batch():
    pad = 7
    rows = [{"input_ids": [3, 4, 5], "labels": 1}, {"input_ids": [3, 4, pad], "labels": 0},
            {"input_ids": [9, 9], "label": 2}]
    batches = pack_step(rows, 16, "classify", batch_size=2, pad_token_id=pad)
    (batch,) = batches
    pooled = batch.input_ids[0][batch.pooled_positions].tolist()
    order = batch.class_labels.tolist()
    assert sorted(zip(order, pooled, strict=True)) == [(0, 4), (1, 5), (2, 9)]  # the rightmost non-pad token, as GPT-2 pools
    weights = dict(zip(order, batch.class_weights.tolist(), strict=True))
    assert weights == {0: 0.5, 1: 0.5, 2: 1.0}  # the Trainer: sum of per-micro-batch means (micro-batches of 2, 1)
    assert batch.targets.eq(IGNORE_INDEX).all()


def test_rows_longer_than_the_budget_are_refused():
    with pytest.raises(PeftlabError, match="token budget"):
        pack_step(rows_for(100, [40]), 32, "sft", batch_size=1)


def test_block_masks_per_layer_type():
    from torch.nn.attention.flex_attention import BlockMask

    from peftlab.engines.fast import block_masks

    gemma = loader.load_model_config(ModelConfig(source="preset:tiny-gemma2"))
    gemma.sliding_window = 4
    docs = torch.tensor([0] * 12 + [1] * 4, dtype=torch.int32)
    masks = block_masks(gemma, docs, block_size=16)
    assert set(masks) == {"full_attention", "sliding_attention"}
    q, kv = torch.arange(16)[:, None], torch.arange(16)[None, :]
    full = masks["full_attention"].mask_mod(0, 0, q, kv)
    sliding = masks["sliding_attention"].mask_mod(0, 0, q, kv)
    assert full[10, 2] and not sliding[10, 2] and sliding[10, 7]  # window: q - kv < 4
    assert not full[12, 11] and full[13, 12] and not full[5, 6]  # documents apart, causal
    gpt2 = loader.load_model_config(ModelConfig(source="preset:tiny-gpt2"))
    assert isinstance(block_masks(gpt2, docs, block_size=16), BlockMask)


def test_step_rows_of_an_empty_dataset_is_an_error_not_an_endless_loop():
    from peftlab.engines.fast.packing import step_rows

    with pytest.raises(ValueError, match="no rows"):
        next(step_rows([], batch_size=2, grad_accum=2, seed=0))
