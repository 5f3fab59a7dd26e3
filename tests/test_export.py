"""`peftlab export`: QLoRA merged into its dequantised base, and every bad export a one-line error.
(Every task's export, against its base + adapter, is in tests/test_verbs.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST

QLORA = ["--set", "method.name=qlora", "--set", "train.max_steps=2", "--set", "train.logging_steps=1",
         "--set", "eval.prompts=[]"]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    from peftlab.cli import main

    fast = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    runs = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["peftlab", "train", "tiny-gemma2-dolly", *fast, *QLORA, "--name", "q",
                                "--runs-dir", str(runs)])
        main()
    return runs


def test_qlora_merges_into_the_dequantised_base(qlora_run, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.config import load_recipe
    from peftlab.models import loader
    from peftlab.models.base import trained_base

    out = qlora_run / "q-merged"
    code, lines = cli("export", "q", "--runs-dir", str(qlora_run))
    assert code == 0 and lines[0].startswith(f"exported q: a transformers model in {out}")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # plain weights: any transformers install loads them
    recipe = load_recipe(str(qlora_run / "q" / "config.yaml"))
    # The reference: the adapter on the 4-bit base's dequantised weights (what the 4-bit layers compute with; the
    # CPU kernels of bitsandbytes round their block scales to bf16 on the first forward, which an exact check avoids).
    base, _ = trained_base(recipe, loader.load_causal_lm)
    reference = PeftModel.from_pretrained(base.dequantize(), str(qlora_run / "q" / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "- qlora" in card and "dequantising its 4-bit weights" in card
    assert "with QLoRA (rank" in card and "- 2 steps, batch" in card


def test_bad_exports_are_one_line(qlora_run, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, lines = cli("export", "q", "--runs-dir", str(qlora_run), "--out", str(qlora_run / "pushed"), "--push", "me/q")
    assert code == 2 and lines[-1].startswith("error: --push me/q: HF_HUB_OFFLINE is set") and "fix: " in lines[-1]
    assert (qlora_run / "pushed" / "model.safetensors").is_file()  # the export itself is kept
    code, lines = cli("export", "q", "--runs-dir", str(qlora_run), "--out", str(qlora_run / "q" / "inside"))
    assert code == 2 and "inside the run folder" in lines[-1]
    (qlora_run / "empty").mkdir()
    (qlora_run / "empty" / "config.yaml").write_text((qlora_run / "q" / "config.yaml").read_text())
    (qlora_run / "empty" / "summary.json").write_text('{"status": "failed"}')
    code, lines = cli("export", "empty", "--runs-dir", str(qlora_run))
    assert code == 2 and "has no adapter/" in lines[-1]
    # a folder of the user's own is refused, not replaced whole; an earlier export is replaced
    (qlora_run / "mine").mkdir()
    (qlora_run / "mine" / "thesis.txt").write_text("keep")
    code, lines = cli("export", "q", "--runs-dir", str(qlora_run), "--out", str(qlora_run / "mine"))
    assert code == 2 and lines[-1].startswith(f"error: --out {qlora_run / 'mine'}: holds files of its own (thesis.txt)")
    assert (qlora_run / "mine" / "thesis.txt").read_text() == "keep"
    code, lines = cli("export", "q", "--runs-dir", str(qlora_run), "--out", str(qlora_run / "pushed"))
    assert code == 0 and (qlora_run / "pushed" / "model.safetensors").is_file()


def test_diffusion_qlora_serves_and_exports_its_trained_4bit_unet(tmp_path, cli, monkeypatch):
    """generate runs on the 4-bit UNet the adapter was trained with; export merges into its dequantised weights;
    both compute the same function."""
    import bitsandbytes
    from diffusers import StableDiffusionPipeline

    from peftlab.config import load_recipe
    from peftlab.runs import RunDir
    from peftlab.tasks import diffusion

    # One CPU path: bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel at a layer's first no-grad forward.
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False, raising=False)
    runs = tmp_path / "runs"
    code, _ = cli("train", "tiny-sd-vangogh", "--set", "method.name=qlora", "--set", "train.max_steps=2",
                  "--set", "data.max_samples=4", "--set", "eval.prompts=[]", "--set", "train.precision=fp32",
                  "--name", "sdq", "--runs-dir", str(runs))
    assert code == 0
    run = RunDir(runs / "sdq")
    recipe = load_recipe(str(run.config_path))
    served = diffusion.load_for_inference(run, recipe).unet
    assert any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in served.modules())
    assert cli("export", "sdq", "--runs-dir", str(runs))[0] == 0
    merged = StableDiffusionPipeline.from_pretrained(runs / "sdq-merged").unet.eval()
    assert not any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in merged.modules())
    cfg = merged.config
    torch.manual_seed(0)
    sample = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    states, t = torch.randn(1, 8, cfg.cross_attention_dim), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(merged(sample, t, states).sample, served(sample, t, states).sample, rtol=1e-4, atol=1e-4)
