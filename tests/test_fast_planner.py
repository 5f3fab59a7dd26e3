"""Fast engine planner and compile plumbing: budgets from padding and measured memory; regional compile keeps
the step's values; the compile cache key and files."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from peftlab.engines.fast import FastModel, pack_step
from peftlab.engines.fast.compile import CompileCache, cache_key, compile_layers
from peftlab.engines.fast.planner import candidate_budgets, plan, smaller_sizes


def steps_of(lengths_per_step):
    return [[{"input_ids": [5] * n, "labels": [5] * n} for n in lengths] for lengths in lengths_per_step]


def test_candidate_budgets_hold_the_longest_row_and_stop_at_the_largest_step():
    assert candidate_budgets(768, 1500) == [768, 1024, 2048]
    assert candidate_budgets(100, 50) == [128]


def test_plan_without_a_device_minimises_padding_and_rows():
    steps = steps_of([[700, 300, 200, 100]] * 4)  # 1,300 tokens per step
    chosen = plan(steps, "sft", batch_size=4, max_length=768)
    assert chosen.budget == 2048 and chosen.rows_per_step == 1 and not chosen.measured_memory
    assert not chosen.gradient_checkpointing and "not measured" in chosen.describe()


def test_plan_respects_the_memory_cap_and_checkpoints_only_when_needed():
    steps = steps_of([[700] * 8] * 2)  # 5,600 tokens per step
    peak = {False: 2.0, True: 0.8}  # GiB per 1k tokens, without and with activation checkpointing

    def trial(budget, checkpointing):
        return peak[checkpointing] * budget / 1024

    free = plan(steps, "sft", 1, 768, trial)
    assert free.budget == 8192 and not free.gradient_checkpointing  # no cap: one row per step
    capped = plan(steps, "sft", 1, 768, trial, memory_limit_gib=5.0)
    assert capped.budget == 2048 and not capped.gradient_checkpointing and capped.peak_gib <= 5.0
    tight = plan(steps, "sft", 1, 768, trial, memory_limit_gib=1.0)
    assert tight.budget == 768 and tight.gradient_checkpointing and tight.peak_gib <= 1.0
    assert "trial peak 4.0 GiB under the 5.0 GiB cap" in capped.describe()
    assert [c.budget for c in capped.candidates] == [8192, 4096, 2048]  # cheapest first, until one fits
    with pytest.raises(ValueError, match="memory_limit_gib"):
        plan(steps, "sft", 1, 768, trial, memory_limit_gib=0.1)


def test_under_a_tight_cap_budgets_the_first_trial_predicts_over_it_are_skipped_untried():
    """Each trial is a cold compile on the device: with the memory held before a trial known, the trial of the
    largest budget predicts the others (held + activations linear in tokens); those far over the cap are skipped."""
    steps = steps_of([[700] * 8] * 2)  # 5,600 tokens per step: 8,192 is the cheapest budget
    trials = []

    def trial(budget, checkpointing):  # 5 GiB of weights + 2 GiB per 1k tokens, a little over linear
        trials.append((budget, checkpointing))
        return 5.0 + 2.0 * budget / 1024 * (1.05 if budget < 8192 else 1.0)

    capped = plan(steps, "sft", 1, 768, trial, memory_limit_gib=10.0, held_gib=5.0)
    assert trials == [(8192, False), (2048, False)] and capped.budget == 2048  # 4,096 predicted 13 GiB: skipped
    skipped = [c for c in capped.candidates if c.peak_gib is None]
    assert [(c.budget, c.predicted_gib) for c in skipped] == [(4096, 13.0)]
    trials.clear()  # near the cap (within the margin) a prediction is tried, not trusted: 4,096 at 13.4 GiB
    near = plan(steps, "sft", 1, 768, trial, memory_limit_gib=12.0, held_gib=5.0)
    assert trials == [(8192, False), (4096, False), (2048, False)] and near.budget == 2048
    trials.clear()  # without the held memory, every candidate is tried as before
    plan(steps, "sft", 1, 768, trial, memory_limit_gib=10.0)
    assert trials == [(8192, False), (4096, False), (2048, False)]


def test_trials_stop_at_the_cheapest_budget_that_fits():
    """Usually one trial runs: the cheapest budget by padding, which is then the run's first compiled step."""
    steps = steps_of([[500, 500]] * 9 + [[700] * 6])  # mostly 1k-token steps, one of 4.2k
    trials = []

    def trial(budget, checkpointing):
        trials.append((budget, checkpointing))
        return budget / 1024

    chosen = plan(steps, "sft", 1, 768, trial, memory_limit_gib=40.0)
    # 2,048 with 1,024- and 1,536-token rows where they fit: the 1k steps take one 1,024 row as with a 1,024
    # budget, the 4.2k step three 1,536 rows (two documents of 700 each) instead of six 1,024 ones
    assert trials == [(2048, False)] and chosen.budget == 2048 and chosen.sizes == (1024, 1536)
    assert chosen.peak_gib == 2.0 and chosen.rows_per_step == 1.2
    assert chosen.padding_fraction == pytest.approx(1 - 13200 / (9 * 1024 + 3 * 1536))


def test_rows_that_fit_the_smaller_size_are_cut_to_it():
    steps = steps_of([[700, 300, 200, 100]] * 2 + [[500, 300]] * 2)  # 1,300 and 800 tokens per step
    one_shape = [b.budget for s in steps for b in pack_step(s, 2048, "sft", 1)]
    two_shapes = [b.budget for s in steps for b in pack_step(s, 2048, "sft", 1, sizes=(1024,))]
    three_shapes = [b.budget for s in steps for b in pack_step(s, 2048, "sft", 1, sizes=(1024, 1536))]
    assert one_shape == [2048] * 4 and two_shapes == [2048, 2048, 1024, 1024]
    assert three_shapes == [1536, 1536, 1024, 1024]
    chosen = plan(steps, "sft", 1, 768)
    assert chosen.budget == 2048 and chosen.sizes == (1024, 1536)
    assert "rows that fit: 1024, 1536" in chosen.describe()
    assert chosen.padding_fraction == pytest.approx(1 - 4200 / (2 * 1536 + 2 * 1024))


def test_smaller_sizes_hold_the_longest_document_in_whole_flex_blocks():
    assert smaller_sizes(2048, 768) == (1024, 1536)
    assert smaller_sizes(1024, 768) == (768,)  # the half (512) would not hold a 768-token document
    assert smaller_sizes(768, 768) == ()
    assert smaller_sizes(1280, 128) == (640,)  # 960 is not a whole number of 128-token blocks


def tiny_fast_model():
    from peftlab.config import LoraSettings, ModelConfig
    from peftlab.models import adapt, loader

    model = loader.load_causal_lm(ModelConfig(source="preset:tiny-gemma2"), torch.float32, "eager")
    return FastModel(adapt.apply_lora(model, LoraSettings(dropout=0.0)), "sft")


def test_regional_compile_gives_the_eager_loss_and_gradients():
    """The CPU check uses the aot_eager backend (the graph capture and autograd of compile, without a C++
    toolchain); inductor on the GPU is the bench's business."""
    fast = tiny_fast_model()
    rows = steps_of([[30, 20, 40]])[0]
    (batch,) = pack_step(rows, 128, "sft", 3)
    assert assert_compiled_matches_eager(fast, batch) == fast.config.num_hidden_layers


def assert_compiled_matches_eager(fast: FastModel, batch) -> int:
    """Loss and LoRA gradients of `batch`, eager then with the layers compiled by aot_eager, equal; returns how
    many layers were compiled."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = fast.loss(batch)
        eager.backward()
        want = [p.grad.clone() for _, p in fast.trainable_parameters()]
        fast.peft_model.zero_grad(set_to_none=True)
        compiled_layers = compile_layers(fast, backend="aot_eager")
        compiled = fast.loss(batch)
        compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-6)
    for (_, p), g in zip(fast.trainable_parameters(), want, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)
    return compiled_layers


def test_cache_key_follows_shapes_and_the_cache_round_trips(tmp_path, monkeypatch):
    fast = tiny_fast_model()
    key = cache_key(fast, 1024, False)
    assert key == cache_key(fast, 1024, False)
    assert len({key, cache_key(fast, 2048, False), cache_key(fast, 1024, True)}) == 3
    cache = CompileCache(key, root=tmp_path)
    assert not cache.load()  # nothing yet
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled kernels", None))
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    assert cache.save() == {"bytes": 16}
    assert cache.load() and loaded == [b"compiled kernels"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on the CPU needs a C++ compiler")
def test_compile_cache_keeps_4bit_graphs_in_the_aot_autograd_cache(tmp_path, monkeypatch):
    """A QLoRA graph holds bitsandbytes' MatMul4Bit (a custom autograd.Function), which torch's AOTAutograd cache
    bypasses by default: a warm start then re-ran AOTAutograd. Under CompileCache.load() it is cached."""
    import bitsandbytes as bnb
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions", False)
    CompileCache("4bit", root=tmp_path).load()
    base = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")  # .to() packs it
    lora = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False), torch.nn.Linear(8, 64, bias=False))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda x: base(x) + lora(x), backend="inductor")
    compiled(torch.randn(4, 64)).sum().backward()
    aot = counters["aot_autograd"]
    assert aot["autograd_cache_bypass"] == 0 and aot["autograd_cache_saved"] + aot["autograd_cache_hit"] == 1
    assert lora[0].weight.grad is not None


def test_model_flops_is_the_reference_formula():
    """bench-hf's sft_gemma2.model_flops for gemma-2-2b, written out: 26 layers of q,k,v,o + 3 MLP maps."""
    from peftlab.config import ModelConfig
    from peftlab.engines.fast.flops import model_flops
    from peftlab.models.loader import load_model_config

    config = load_model_config(ModelConfig(source="preset:gemma-2-2b"))
    n_layers = 26 * (2304 * 2048 + 2 * 2304 * 1024 + 2048 * 2304 + 3 * 2304 * 9216)
    n_head = 256000 * 2304
    assert model_flops(config, 1000, 50_000, False) == (4 * n_layers + 4 * n_head) * 1000 + 12 * 26 * 2048 * 50_000
    assert model_flops(config, 1000, 50_000, True) == (6 * n_layers + 4 * n_head) * 1000 + 16 * 26 * 2048 * 50_000
    gpt2 = load_model_config(ModelConfig(source="preset:dialogpt-medium"))
    assert model_flops(gpt2, 10, 0, False, lm_head=False) == 4 * 24 * 12 * 1024 * 1024 * 10


def test_evaluation_and_generation_shapes_run_the_layers_without_compiling():
    """Between training steps (eager()) and after training (uncompile_layers) the padded batches of evaluation and
    generation reuse no compiled graph and make no new one; without them a new shape compiles again."""
    from peftlab.engines.fast.compile import eager, uncompile_layers

    torch._dynamo.reset()
    fast = tiny_fast_model()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    (batch,) = pack_step(steps_of([[30, 20]])[0], 128, "sft", 2)

    def padded_forward(length: int) -> None:
        fast.restore_attention()
        with torch.no_grad():
            fast.peft_model(input_ids=torch.ones(2, length, dtype=torch.long))
        fast.use_packed_attention()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_layers(fast, backend=counting_backend)
        fast.loss(batch).backward()
        compiled = len(graphs)
        assert compiled > 0
        with eager():
            padded_forward(17)
        assert len(graphs) == compiled
        uncompile_layers(fast)
        padded_forward(23)
        assert len(graphs) == compiled
        compile_layers(fast, backend=counting_backend)  # the contrast: compiled layers meet a new shape
        padded_forward(29)
        assert len(graphs) > compiled


def test_regional_compile_traces_a_4bit_base_whole(tiny_recipe, monkeypatch):
    """QLoRA under regional compile: bitsandbytes' 4-bit matmul is a registered torch op, so each layer stays one
    graph (no graph break) and gives the eager loss and gradients (aot_eager on the CPU, as above)."""
    import bitsandbytes.nn.modules
    from torch._dynamo.utils import counters

    from peftlab.tasks import sft

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)  # one bnb CPU path
    recipe = tiny_recipe({"method.name": "qlora", "method.lora.dropout": 0.0, "data.max_samples": 20,
                          "data.eval_fraction": 0.0, "data.max_length": 64})
    setup = sft.build(recipe)
    fast = FastModel(setup.model, "sft")
    assert sum(type(m).__name__ == "Linear4bit" for m in fast.decoder_layers.modules()) > 0
    (batch,) = pack_step([setup.data.train[i] for i in range(3)], 256, "sft", 3)
    torch._dynamo.reset()
    counters.clear()
    assert_compiled_matches_eager(fast, batch)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] > 0


def test_a_recorded_plan_is_reused_without_trials_under_the_same_cap(tmp_path):
    """Issue 11's warm start: a second run of the same compile-cache key takes the trial peaks from plan.json."""
    from peftlab.engines.fast.planner import RecordedTrials, read_record, write_record

    steps = steps_of([[700] * 8] * 2)
    trials = []

    def measure(budget, checkpointing):
        trials.append((budget, checkpointing))
        return 2.0 * budget / 1024

    record = tmp_path / "plan.json"
    first = plan(steps, "sft", 1, 768, RecordedTrials(read_record(record, 5.0, 80.0), measure), 5.0, 80.0)
    assert trials == [(8192, False), (4096, False), (2048, False)] and not first.reused
    write_record(record, first, 5.0, 80.0)

    again = RecordedTrials(read_record(record, 5.0, 80.0), measure)
    second = plan(steps, "sft", 1, 768, again, 5.0, 80.0)
    assert again.measured == 0 and len(trials) == 3  # no trial step ran
    assert (second.budget, second.gradient_checkpointing, second.peak_gib) == (first.budget, False, 4.0)

    other_cap = RecordedTrials(read_record(record, 10.0, 80.0), measure)  # another memory_limit_gib: measured again
    assert plan(steps, "sft", 1, 768, other_cap, 10.0, 80.0).budget == 4096 and other_cap.measured == 2
    assert read_record(record, 5.0, 40.0) == {}  # another device size
    record.write_text("{torn")
    assert read_record(record, 5.0, 80.0) == {} and read_record(tmp_path / "none.json", 5.0, 80.0) == {}


def test_the_trainer_plans_from_the_record_and_says_so(tiny_recipe, tmp_path, monkeypatch):
    """FastTrainer.plan on a (faked) device: the record's peaks replace the trial, and the plan text says so."""
    from peftlab.engines.fast import trainer as fast_trainer
    from peftlab.tasks import sft

    recipe = tiny_recipe({"data.max_samples": 40, "data.eval_fraction": 0.0, "data.max_length": 64})
    setup = sft.build(recipe)
    fast = fast_trainer.FastTrainer(setup.model, "sft", recipe.train, "fp32", recipe.data.max_length)
    trials = []
    monkeypatch.setattr(fast_trainer, "trial_peak_gib", lambda *a: lambda b, c: trials.append((b, c)) or 1.0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * 1024**3}))
    record = tmp_path / "plan.json"
    first = fast.plan(setup.data.train, recipe.seed, measure=True, record=record)
    assert len(trials) == 1 and not first.reused and "reused" not in first.describe()
    fast_trainer.write_record(record, first, None, 80.0)
    second = fast.plan(setup.data.train, recipe.seed, measure=True, record=record)
    assert len(trials) == 1 and second.reused and second.budget == first.budget
    assert "reused from the compile cache's plan record (no trial step)" in second.describe()
    assert second.as_dict()["reused"] is True
