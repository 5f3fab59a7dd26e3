"""One rank of tests/test_gpus.py's FSDP adapter test (run under torchrun, gloo, CPU): a LoRA model of the
tiny Gemma-2 preset, sharded with torch's FSDP2 (`fully_shard`, as the Trainer's FSDP does), saved through
peftlab's save_adapter, then its sample generations written as after training (every rank takes part);
rank 0 also writes the sharded model's logits for the single-process check."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.config import load_recipe
from peftlab.models.presets import preset_checkpoint
from peftlab.runs import RunDir
from peftlab.tasks.common import save_adapter
from peftlab.tasks.sft import write_samples

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
os.environ["PEFTLAB_STRATEGY"] = "fsdp"
if rank == 0:  # built once: two ranks building a fresh preset cache at once failed once (config without model_type)
    preset_checkpoint("tiny-gemma2", torch.float32)
dist.barrier()
base = preset_checkpoint("tiny-gemma2", torch.float32)
torch.manual_seed(0)  # the same LoRA init on both ranks; init_lora_weights=False: B is not zero, the adapter matters
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                       LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
sharded = [n for n, p in model.named_parameters() if "lora_A" in n and p.to_local().numel() < p.numel()]
assert sharded, "no LoRA weight is actually sharded: the test would prove nothing"
ids = torch.arange(3, 19).reshape(2, 8)
with torch.no_grad():
    logits = model(input_ids=ids).logits
run, tokenizer = RunDir(out / "run", writer=rank == 0), AutoTokenizer.from_pretrained(base)
save_adapter(run, model, tokenizer)
write_samples(run, load_recipe("tiny-gemma2-dolly", ['eval.prompts=["Hi"]', "eval.max_new_tokens=4"]), model, tokenizer)
if rank == 0:
    torch.save({"input_ids": ids, "logits": logits, "base": str(base)}, out / "sharded.pt")
dist.barrier()
dist.destroy_process_group()
