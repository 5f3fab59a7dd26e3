"""The fast engine's CUDA-graph micro-steps (engines/fast/graphs.py).

On the CPU: the host side of a replay -- the static row that every row of one budget is copied into, padded per
document for classification -- gives the same loss as the row itself, including after a row with MORE documents
left stale entries behind. On CUDA (skipped elsewhere): captured micro-steps train the same function as eager ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab.engines.fast import FastLoop, FastModel, LoopSettings, pack_step
from peftlab.engines.fast.graphs import _Captured, _static_row
from peftlab.tasks import classify

BUDGET = 128


class NoGraph:
    """Stands in for a captured torch.cuda.CUDAGraph on the CPU: the test re-runs the loss itself."""

    def replay(self) -> None:
        pass


def rows_of(dataset, n: int) -> list[dict]:
    return [{"input_ids": list(r["input_ids"]), "labels": int(r["labels"])} for r in list(dataset)[:n]]


@pytest.fixture
def classifier(tiny_classifier):
    recipe = tiny_classifier({"data.max_samples": 80})
    setup = classify.build(recipe)
    setup.model.eval()  # no dropout: the same row must give the same loss twice
    return FastModel(setup.model, "classify"), setup


def test_a_static_row_gives_the_rows_classification_loss(classifier):
    fast, setup = classifier
    pad = setup.tokenizer.pad_token_id
    (many,) = pack_step(rows_of(setup.data.train, 6), BUDGET, "classify", 6, pad)
    (few,) = pack_step(rows_of(setup.data.train, 2), BUDGET, "classify", 2, pad)
    assert many.documents > few.documents >= 1

    static = _static_row(many, torch.device("cpu"))
    assert static.pooled_positions.shape == (BUDGET,) and static.class_weights[many.documents:].eq(0).all()
    with torch.no_grad():
        assert fast.loss(static).item() == pytest.approx(fast.loss(many).item(), rel=1e-6)
        captured = _Captured(NoGraph(), static, torch.zeros(()))
        captured.replay(few)  # fewer documents than the row captured: the rest must weigh nothing
        assert fast.loss(static).item() == pytest.approx(fast.loss(few).item(), rel=1e-6)
        assert torch.equal(static.input_ids, few.input_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_micro_steps_train_as_eager_ones_on_cuda(tiny_recipe):
    from peftlab.tasks import sft

    recipe = tiny_recipe({"data.max_samples": 64, "data.max_length": 64, "method.lora.dropout": 0.0})
    model = sft.build(recipe).model.cuda()
    data = sft.build(recipe).data.train
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in list(data)[:32]]
    steps = [pack_step(rows[i:i + 4], BUDGET, "sft", 4) for i in range(0, 32, 4)]
    losses = {}
    for graphs in (True, False):
        loop = FastLoop(FastModel(copy.deepcopy(model), "sft"), LoopSettings.from_train_config(recipe.train, 8),
                        cuda_graphs=graphs)
        losses[graphs] = [loop.step(step, _Hooks())[0].item() for step in steps]
        assert loop.graph_failure is None
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


class _Hooks:
    def on_micro_batch(self, batch) -> None:
        pass

    def on_log(self, record) -> None:
        pass

    def on_step_end(self, step: int) -> bool:
        return False
