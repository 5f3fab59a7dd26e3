"""The names users bring from the HF/TRL/peft/axolotl stack, accepted as aliases of recipe fields.

A recipe written as `learning_rate: 2e-4` (TrainingArguments), `lora_alpha: 32` (peft's LoraConfig),
`micro_batch_size: 4` (axolotl) or `--set gradient_accumulation_steps=4` means one of our fields; refusing it
with a spelling-distance hint (`padding_free`?) helps nobody. Each alias maps to one dotted recipe key and,
where the meaning differs in form (`bf16: true`, `adapter: qlora`), to the value it stands for. The resolved
recipe saved in a run folder uses our names only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftlab.errors import PeftlabError

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _precision_flag(name: str) -> Callable[[Any], Any]:
    # TrainingArguments' `bf16: true` / `fp16: true`: a flag for what our train.precision names.
    def convert(value: Any) -> Any:
        if value is True:
            return name
        raise ValueError(f"only `{name}: true` has a meaning here; fix: set train.precision instead")

    return convert


def _dtype(value: Any) -> Any:
    return DTYPE_NAMES.get(str(value).removeprefix("torch."), value)


def _eval_metric(value: Any) -> Any:
    # The Trainer prefixes `eval_` to metric_for_best_model when it is missing; so do we.
    return value if value is None or str(value).startswith("eval_") else f"eval_{value}"


def _four_bit(value: Any) -> Any:
    if value is True:
        return "qlora"
    raise ValueError("only `load_in_4bit: true` has a meaning here; fix: set method.name instead")


# alias -> (our dotted key, value conversion or None)
STANDARD_NAMES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    # transformers TrainingArguments / TRL SFTConfig
    "learning_rate": ("train.lr", None),
    "per_device_train_batch_size": ("train.batch_size", None),
    "micro_batch_size": ("train.batch_size", None),  # axolotl
    "gradient_accumulation_steps": ("train.grad_accum", None),
    "num_train_epochs": ("train.epochs", None),
    "num_epochs": ("train.epochs", None),  # axolotl
    "lr_scheduler_type": ("train.scheduler", None),
    "lr_scheduler": ("train.scheduler", None),  # axolotl
    "optim": ("train.optimizer", None),
    "metric_for_best_model": ("train.best_metric", _eval_metric),
    "bf16": ("train.precision", _precision_flag("bf16")),
    "fp16": ("train.precision", _precision_flag("fp16")),
    "max_seq_length": ("data.max_length", None),  # TRL before 0.20
    "sequence_len": ("data.max_length", None),  # axolotl
    "dataset_name": ("data.source", None),
    "report_to": ("tracking.report_to", None),
    "output_dir": ("output_dir", None),  # written inside `train:` as TrainingArguments holds it; ours is top-level
    "model_name_or_path": ("model.source", None),
    "base_model": ("model.source", None),  # axolotl
    # peft LoraConfig / BitsAndBytesConfig, flat as axolotl and LLaMA-Factory write them
    "lora_r": ("method.lora.r", None),
    "lora_rank": ("method.lora.r", None),  # LLaMA-Factory
    "lora_alpha": ("method.lora.alpha", None),
    "lora_dropout": ("method.lora.dropout", None),
    "lora_target_modules": ("method.lora.target_modules", None),
    "lora_target": ("method.lora.target_modules", None),  # LLaMA-Factory
    "peft_use_dora": ("method.lora.use_dora", None),
    "adapter": ("method.name", None),  # axolotl: lora | qlora
    "load_in_4bit": ("method.name", _four_bit),
    "bnb_4bit_quant_type": ("method.quant.type", None),
    "bnb_4bit_use_double_quant": ("method.quant.double_quant", None),
    "bnb_4bit_compute_dtype": ("method.quant.compute_dtype", _dtype),
}
# Names that are ours in one section and written flat (at the top of the recipe) by axolotl and TRL users.
FLAT = {
    "train": ("max_steps", "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "logging_steps",
              "eval_steps", "save_steps", "save_total_limit", "gradient_checkpointing", "padding_free"),
    "model": ("attn_implementation", "trust_remote_code"),
    "data": ("max_length",),
    "method.lora": ("target_modules", "use_dora"),
}
ALIASES = {**STANDARD_NAMES, **{name: (f"{section}.{name}", None) for section, names in FLAT.items() for name in names}}


# Trainer names whose meaning lives outside the recipe here: the hint says where.
ELSEWHERE = {
    "run_name": "a run's name is its folder's; fix: remove it and pass `--name {value}` (or set output_dir)",
    "logging_dir": "trackers write inside the run folder; fix: remove it (tracking.report_to picks the trackers)",
}


def elsewhere(key: str, value: Any) -> str:
    """Where a Trainer argument that is no recipe field lives, with the command-line flag for the value given."""
    text = str(value) if isinstance(value, str | int | float) else ""
    return ELSEWHERE[key].format(value=text or "NAME")


def resolve(path: list[str], key: str, is_field: Callable[[list[str], str], bool]) -> list[str] | None:
    """Our dotted key (as parts) for `key` found under section `path`, or None when `key` is no alias there.
    A name that is a real field where it stands is never treated as an alias."""
    if is_field(path, key) or key not in ALIASES:
        return None
    return ALIASES[key][0].split(".")


def convert(key: str, value: Any, origin: str) -> Any:
    """The value alias `key` stands for; a value the alias cannot mean is one line."""
    conversion = ALIASES[key][1]
    if conversion is None:
        return value
    try:
        return conversion(value)
    except ValueError as exc:
        raise PeftlabError(f"{origin}: {key}: {exc}") from None


def normalize(data: dict[str, Any], is_field: Callable[[list[str], str], bool], origin: str,
              path: list[str] | None = None, root: dict[str, Any] | None = None,
              is_section: Callable[[list[str]], bool] = lambda path: True) -> dict[str, Any]:
    """Move every alias in `data` (at the top or inside a section) to its field, in place; returns `data`.
    An alias and its field both set to different values is an error naming both. is_section(path): whether the
    dict at `path` is a section of fields; a field whose VALUE is a dict (sweep.space: parameter names of the
    user's own) is data, never searched for aliases."""
    path, root = path or [], root if root is not None else data
    for key in list(data):
        target = resolve(path, key, is_field)
        if target is None:
            if isinstance(data[key], dict) and is_field(path, key) and is_section([*path, key]):
                normalize(data[key], is_field, origin, [*path, key], root, is_section)
            continue
        value = convert(key, data.pop(key), origin)
        node = root
        for part in target[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PeftlabError(f"{origin}: '{part}' is a value, not a section (alias '{key}' sets {'.'.join(target)})")
        if target[-1] in node and node[target[-1]] != value:
            raise PeftlabError(f"{origin}: '{key}' and '{'.'.join(target)}' are the same field, set to "
                               f"{value!r} and {node[target[-1]]!r}; fix: keep one of them")
        node[target[-1]] = value
    return data


def suggestion(word: str, valid: list[str]) -> str | None:
    """A did-you-mean hint naming our key, when a mistyped name is closer to a known alias than to any valid name
    here; else None (the caller falls back to spelling distance over the valid names)."""
    from peftlab.errors import closest

    alias = closest(word, ALIASES)
    if alias is None:
        return None
    own = closest(word, valid)
    if own is not None and _likeness(word, own) >= _likeness(word, alias):
        return None
    target = ALIASES[alias][0]
    return f"fix: did you mean '{target}'?" + ("" if target == alias else f" ('{alias}' is accepted for it too)")


def _likeness(a: str, b: str) -> float:
    from difflib import SequenceMatcher

    return SequenceMatcher(None, a, b).ratio()
