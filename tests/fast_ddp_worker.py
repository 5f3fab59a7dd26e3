"""One rank of tests/test_fast_trainer.py's data-parallel test (torchrun, gloo, CPU): FastTrainer on the tiny
Gemma-2 twin with the recipe given (batch_size rows per process); rank 0 writes the step losses and the final
trainable weights."""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from peftlab.config import load_recipe
from peftlab.engines.fast.trainer import FastTrainer
from peftlab.models.presets import preset_checkpoint
from peftlab.tasks import sft

recipe_path, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 0:  # built once: two ranks building a fresh preset cache at once failed once (fsdp_adapter_worker.py)
    preset_checkpoint("tiny-gemma2", torch.float32)
dist.barrier()
recipe = load_recipe(recipe_path)
setup = sft.build(recipe)
trainer = FastTrainer(setup.model, "sft", recipe.train, "fp32", recipe.data.max_length)


class Hooks:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.tokens = 0

    def on_micro_batch(self, batch) -> None:
        self.tokens += batch.tokens

    def on_log(self, record) -> None:
        self.losses[int(record["step"])] = record["loss"]

    def on_step_end(self, step: int) -> bool:
        return False


hooks = Hooks()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    report = trainer.fit(setup.data.train, recipe.seed, hooks)
tokens = torch.tensor([hooks.tokens])
dist.all_reduce(tokens)
if rank == 0:
    weights = {n: p.detach().clone() for n, p in trainer.model.trainable_parameters()}
    torch.save({"losses": hooks.losses, "weights": weights, "tokens": int(tokens), "steps": report.steps,
                "own_tokens": hooks.tokens}, out / "ddp.pt")
dist.barrier()
dist.destroy_process_group()
