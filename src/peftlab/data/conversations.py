"""SFT data formats: which one a dataset is in, and conversations -> model-ready examples through TRL.

Formats (`data.format`, `auto` detects them from the columns; `data.columns` maps our names to yours):

- `dolly`: instruction / context / response rows, rendered with `data.template` (data/instructions.py).
- `messages`: OpenAI-style, a list of {role: system|user|assistant, content} per row.
- `sharegpt`: a list of {from: human|gpt|system, value} per row, mapped to messages (human -> user, gpt ->
  assistant; `user` and `assistant` are accepted too). TRL's own ShareGPT conversion keeps `from` as the role,
  so a `human`/`gpt` row would reach the chat template with roles it does not know: we map them here.
- `prompt_completion`: TRL's prompt-completion format, two strings or two lists of messages per row.

What is trained, by TRL's own machinery (trl 1.16's SFTTrainer dataset preparation): `messages` and
`sharegpt` with `assistant_only_loss` (the assistant turns as the chat template's `{% generation %}` markers
delimit them, with their end-of-turn token); `prompt_completion` with `completion_only_loss` (the completion,
plus EOS for plain strings). Everything else (system, user, template text) is -100.

Chat template: the model's own (`auto`, `model`), TRL's training variant of it when it lacks generation
markers (TRL ships one for Gemma, Llama 3, Qwen, Phi, ...), or, where the model has none (our tiny twins'
bundled BPE, GPT-2), the Zephyr layout with the tokenizer's EOS as end-of-turn (`zephyr`, below). The
template is set on the tokenizer, so it is saved with the adapter and `generate` uses it; the run's
summary names it (`data_format.template`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jinja2 import TemplateError

from peftlab.config import DataConfig

# The statistics and the eval split are the dolly format's own, shared so both formats report the same numbers.
from peftlab.data.instructions import (
    FIELDS,
    IGNORE_INDEX,
    OPTIONAL_FIELDS,
    InstructionData,
    _split,
    _stats,
    adds_bos,
    build_instruction_data,
    prompt_ids,
    render_prompt,
)
from peftlab.data.sources import load_table, map_columns
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.watch.progress import phase

# format -> (the fields that must all be there, every field of the format); the order breaks no ties: two
# complete formats in one table are an error.
FORMAT_FIELDS = {
    "messages": (("messages",), ("messages",)),
    "sharegpt": (("conversations",), ("conversations",)),
    "prompt_completion": (("prompt", "completion"), ("prompt", "completion")),
    "dolly": (FIELDS, FIELDS + OPTIONAL_FIELDS),
}
LOSS = {
    "messages": "the assistant turns + their end-of-turn token (TRL assistant_only_loss)",
    "sharegpt": "the gpt turns + their end-of-turn token (TRL assistant_only_loss)",
    "prompt_completion": "the completion (TRL completion_only_loss)",
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

# The Zephyr layout (HuggingFaceH4/zephyr-7b-beta): `<|role|>\n{content}{eos}\n` per turn, `<|assistant|>\n`
# as the generation prompt. The end of an assistant turn is the tokenizer's EOS, which every tokenizer has and
# generation stops on, so no token is added to a vocabulary (new embedding rows would stay untrained under LoRA).
# Like TRL's templates, two variants: the serving one (saved with the adapter; no {% generation %} tag, which
# some serving stacks' template engines refuse) and the training one, whose {% generation %} markers around the
# assistant's content and EOS are what assistant_only_loss trains.
_ZEPHYR_TURNS = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\n' }}ASSISTANT{{- '\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)
_ZEPHYR_ANSWER = "{{- message['content'] + eos_token }}"
ZEPHYR_TEMPLATE = _ZEPHYR_TURNS.replace("ASSISTANT", _ZEPHYR_ANSWER)
ZEPHYR_TRAINING_TEMPLATE = _ZEPHYR_TURNS.replace("ASSISTANT", f"{{% generation %}}{_ZEPHYR_ANSWER}{{% endgeneration %}}")


@dataclass
class DataFormat:
    """What the run trained on: the summary's `data_format` and the line the run and the doctor print."""

    name: str  # dolly | messages | sharegpt | prompt_completion
    detected: str  # how it was chosen
    template: str  # what rendered the text
    loss: str  # which tokens are trained
    prompt_style: str  # how `generate` renders a prompt: dolly | chat | text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"data format: {self.name} ({self.detected}); template: {self.template}; trained: {self.loss}"


def build_sft_data(cfg: DataConfig, tokenizer: Any, seed: int) -> tuple[InstructionData, DataFormat, list[str]]:
    """Train/eval examples (input_ids + labels, -100 where the loss does not look), the format, and notes.

    Errors: one PeftlabError line for a bad file, column, row or template; GuardFailure if every example's
    trained tokens lie beyond data.max_length."""
    if cfg.format in ("auto", "dolly") and cfg.source == "bundled:dolly15k" and not cfg.columns:
        return _dolly(cfg, tokenizer, seed, "the bundled Dolly data")
    table = load_table(cfg.source, cfg.split)
    name, detected = detect_format(list(table.column_names), cfg)
    if name == "dolly":
        return _dolly(cfg, tokenizer, seed, detected)
    # Every row is checked, in file order (errors name the file's row), then shuffled and cut as the dolly rows are.
    rows = normalize_rows(map_columns(table, FORMAT_FIELDS[name][0], (), cfg.columns, cfg.source).to_list(), name, cfg)
    picked = rows[:]
    random.Random(seed).shuffle(picked)
    picked = picked[: cfg.max_samples] if cfg.max_samples else picked
    chat = name != "prompt_completion" or isinstance(picked[0]["prompt"], list)
    template, train_template, notes = _templates(tokenizer, cfg, name, chat)
    try:
        with phase(f"tokenizing {len(picked)} rows (TRL, {name})"):  # TRL's map: no count to follow
            encoded = trl_prepare(picked, tokenizer, name, train_template)
    except (TemplateError, RuntimeError, ValueError) as exc:
        raise _template_error(rows, tokenizer, train_template, cfg, exc) from None
    loss = LOSS[name] + ("" if chat else " + EOS")
    fmt = DataFormat(name, detected, template, loss, "chat" if chat else "text")
    return finish_encoded(encoded, cfg, seed), fmt, notes


def _templates(tokenizer: Any, cfg: DataConfig, name: str, chat: bool) -> tuple[str, str | None, list[str]]:
    """(the template's name, the training template or None for the tokenizer's own, notes)."""
    if not chat:
        return "none (plain text, as TRL tokenizes prompt/completion strings)", None, []
    template = apply_chat_template_choice(tokenizer, cfg.chat_template)
    if name == "prompt_completion":  # the completion mask needs no markers
        return template, None, []
    return training_template(tokenizer, template)


def _dolly(cfg: DataConfig, tokenizer: Any, seed: int, detected: str) -> tuple[InstructionData, DataFormat, list[str]]:
    fmt = DataFormat("dolly", detected, "dolly (data.template)", "the response + EOS", "dolly")
    return build_instruction_data(cfg, tokenizer, seed), fmt, []


def detect_format(columns: list[str], cfg: DataConfig) -> tuple[str, str]:
    """(format, how it was chosen): data.format, else the format whose fields data.columns maps, else the one
    whose columns the table has; none of them is dolly, whose missing-column error lists what the file holds."""
    if cfg.format != "auto":
        return cfg.format, "data.format"
    mapped = [name for name, (_, fields) in FORMAT_FIELDS.items() if any(f in cfg.columns for f in fields)]
    if len(mapped) > 1:
        raise PeftlabError(f"data.columns: maps fields of more than one format ({', '.join(mapped)}); "
                           "fix: map the fields of one format only")
    if mapped:
        return mapped[0], "data.columns"
    present = [name for name, (required, _) in FORMAT_FIELDS.items() if all(f in columns for f in required)]
    if len(present) > 1:
        described = " and ".join(f"{n} (columns {', '.join(FORMAT_FIELDS[n][0])})" for n in present)
        raise PeftlabError(f"data.source '{cfg.source}': holds columns of more than one data format: {described}; "
                           "fix: keep one format per file, or set data.format to the one to train")
    if present:
        return present[0], f"auto: columns {', '.join(FORMAT_FIELDS[present[0]][0])}"
    return "dolly", "auto: the default"


# ---------------------------------------------------------------- rows


def normalize_rows(rows: list[dict[str, Any]], name: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """Rows as TRL's formats: {"messages": [...]} or {"prompt": ..., "completion": ...}, checked."""
    if name == "prompt_completion":
        out = [_prompt_completion(row, i, cfg) for i, row in enumerate(rows)]
        answers = [_text(row["completion"]) for row in out]
    else:
        field = "messages" if name == "messages" else "conversations"
        out = [{"messages": _conversation(row[field], i, field, name, cfg)} for i, row in enumerate(rows)]
        answers = ["".join(m["content"] for m in row["messages"] if m["role"] == "assistant") for row in out]
    if not any(a.strip() for a in answers):
        what = "completion" if name == "prompt_completion" else "assistant turn"
        raise PeftlabError(
            f"data.source '{cfg.source}': every {what} is empty in the {len(rows)} rows, so the model would learn to "
            f"answer nothing; fix: point data.columns at the {what}s' column"
        )
    return out


def _where(cfg: DataConfig, field: str, index: int) -> str:
    """Rows counted from 1, as the lines of a JSONL file."""
    return f"data.source '{cfg.source}': column '{cfg.columns.get(field, field)}' row {index + 1}"


def _conversation(messages: Any, index: int, field: str, name: str, cfg: DataConfig,
                  need_assistant: bool = True) -> list[dict[str, str]]:
    where = _where(cfg, field, index)
    if not isinstance(messages, list) or not messages:
        found = "nothing" if not messages else type(messages).__name__
        raise PeftlabError(f"{where}: holds {found}, not a list of messages; fix: give every row its conversation "
                           "(one format per file; data.format forces one)")
    out = [_message(m, where, j, name) for j, m in enumerate(messages)]
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        said = "gpt" if name == "sharegpt" else "assistant"
        raise PeftlabError(f"{where}: the conversation has no {said} turn, so nothing would be trained; fix: add "
                           f"the {said}'s answer or drop the row")
    return out


def _message(message: Any, where: str, j: int, name: str) -> dict[str, str]:
    keys = ("from", "value") if name == "sharegpt" else ("role", "content")
    if not isinstance(message, dict) or message.get(keys[0]) is None:
        found = ", ".join(k for k, v in message.items() if v is not None) if isinstance(message, dict) else message
        hint = "data.format=sharegpt" if name != "sharegpt" else "data.format=messages"
        raise PeftlabError(f"{where} message {j}: no '{keys[0]}' (found: {found}); fix: give every message "
                           f"{keys[0]} and {keys[1]}, or set {hint} if the file is in that format")
    role, content = message[keys[0]], message.get(keys[1])
    if name == "sharegpt":
        if role not in SHAREGPT_ROLES:
            raise PeftlabError(f"{where} message {j}: unknown 'from' value '{role}'; known: "
                               f"{', '.join(SHAREGPT_ROLES)}; fix: map it to one of them")
        role = SHAREGPT_ROLES[role]
    elif role not in ROLES:
        hint = " (ShareGPT names: set data.format=sharegpt)" if role in ("human", "gpt") else ""
        raise PeftlabError(f"{where} message {j}: unknown role '{role}'{hint}; known: {', '.join(ROLES)}; "
                           "fix: map it to one of them")
    if content is not None and not isinstance(content, str):
        raise PeftlabError(f"{where} message {j}: the {keys[1]} is {type(content).__name__}, not text; "
                           "fix: give text content (multimodal parts are not supported)")
    return {"role": role, "content": content or ""}


def _prompt_completion(row: dict[str, Any], index: int, cfg: DataConfig) -> dict[str, Any]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        return {"prompt": _conversation(prompt, index, "prompt", "messages", cfg, need_assistant=False),
                "completion": _conversation(completion, index, "completion", "messages", cfg)}
    kinds = ", ".join(f"{k} is {'nothing' if v is None else type(v).__name__}" for k, v in row.items())
    raise PeftlabError(f"{_where(cfg, 'prompt', index)}: {kinds}; fix: both text, or both lists of messages")


def _text(value: str | list[dict[str, str]]) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value if m["role"] == "assistant")


# ---------------------------------------------------------------- chat template


def apply_chat_template_choice(tokenizer: Any, choice: str) -> str:
    """Set the serving chat template on the tokenizer (saved with the adapter); returns its name for the summary."""
    if choice == "auto":
        choice = "model" if tokenizer.chat_template else "zephyr"
        if choice == "zephyr":
            tokenizer.chat_template = zephyr_template(tokenizer)
            return "zephyr (peftlab's default: the model's tokenizer has no chat template)"
    if choice == "model":
        if not tokenizer.chat_template:
            raise PeftlabError("data.chat_template: 'model', but the model's tokenizer has no chat template; fix: "
                               "data.chat_template=zephyr or a path to a .jinja file")
        return "the model's chat template"
    if choice == "zephyr":
        tokenizer.chat_template = zephyr_template(tokenizer)
        return "zephyr (data.chat_template)"
    path = Path(choice)
    if path.suffix != ".jinja" or not path.is_file():
        raise PeftlabError(f"data.chat_template: '{choice}' is not auto, model, zephyr or an existing .jinja file; "
                           "fix: use one of those")
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    return f"{path} (data.chat_template)"


def zephyr_template(tokenizer: Any, training: bool = False) -> str:
    """The Zephyr template (serving or training variant) with BOS first only where the tokenizer puts it before
    text itself (Gemma, Llama; not GPT-2): a chat template is tokenized without the tokenizer's special tokens."""
    return ("{{- bos_token }}" if adds_bos(tokenizer) else "") + (ZEPHYR_TRAINING_TEMPLATE if training else ZEPHYR_TEMPLATE)


def training_template(tokenizer: Any, template: str) -> tuple[str, str | None, list[str]]:
    """(its name; the template to tokenize with, None = the tokenizer's; notes), as trl's SFTTrainer chooses it
    for assistant_only_loss: the tokenizer's when it has {% generation %} markers, else its training variant
    (ours for zephyr, TRL's for the templates TRL knows)."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )

    train_template = None
    if tokenizer.chat_template == zephyr_template(tokenizer):
        train_template = zephyr_template(tokenizer, training=True)
    elif not has_generation_markers(tokenizer.chat_template):
        try:
            train_template = get_training_chat_template(tokenizer)
        except ValueError:
            raise PeftlabError(
                "data.chat_template: the chat template has no {% generation %} markers, which mark the assistant "
                "tokens to train, and TRL has no training variant of it; fix: data.chat_template=PATH.jinja with "
                "{% generation %}...{% endgeneration %} around each assistant turn and its end-of-turn token, or "
                "data.chat_template=zephyr"
            ) from None
        template += ", with TRL's training variant (generation markers) for the mask"
    notes = []
    if not is_chat_template_stop_token_trained(tokenizer, chat_template=train_template):
        notes.append("the chat template leaves the assistant's end-of-turn token out of the trained tokens (TRL's "
                     "check): the model may not learn to stop")
    return template, train_template, notes


# ---------------------------------------------------------------- TRL tokenization


def trl_prepare(rows: list[dict[str, Any]], tokenizer: Any, name: str, chat_template: str | None) -> Any:
    """input_ids + labels by trl's own SFTTrainer dataset preparation (chat template, EOS, assistant or
    completion mask -> labels), untruncated.

    Why here and not inside the trainer: every engine takes tokenized rows (engines/__init__.py), and the doctor,
    the data statistics and the guard count the trained tokens before any step. The method is private to trl, so
    trl is pinned (<1.17) and tests/test_conversations.py asserts the exact masks it gives."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    completion_only = name == "prompt_completion"
    args = SFTConfig(output_dir="unused", assistant_only_loss=not completion_only, completion_only_loss=completion_only,
                     max_length=None, bf16=False, report_to="none")
    # The three attributes _prepare_dataset reads, as SFTTrainer.__init__ sets them from these arguments.
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=chat_template, completion_only_loss=completion_only)
    encoded = SFTTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, False, None, "train")
    return encoded.select_columns(["input_ids", "labels"])


def _template_error(rows: list[dict[str, Any]], tokenizer: Any, chat_template: str | None, cfg: DataConfig,
                    exc: Exception) -> PeftlabError:
    """The first row of the file the chat template refuses (e.g. Gemma's 'roles must alternate'), named."""
    for i, row in enumerate(rows):
        messages = row.get("messages") or (row["prompt"] + row["completion"] if isinstance(row["prompt"], list) else [])
        try:
            if messages:
                tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template)
        except Exception as row_exc:  # jinja raises several types; the message is what the user needs
            return PeftlabError(f"data.source '{cfg.source}': row {i + 1}: the chat template refused it ({row_exc}); "
                                "fix: change the row (roles, order) or data.chat_template")
    first = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
    return PeftlabError(f"data.source '{cfg.source}': TRL could not tokenize it with the chat template ({first}); "
                        "fix: check data.chat_template")


def finish_encoded(encoded: Any, cfg: DataConfig, seed: int) -> InstructionData:
    """Truncation at data.max_length (keeping the start, as trl does), statistics, rows left with no trained token
    dropped, and the seeded eval split; the same steps and numbers as the dolly format."""
    max_length = cfg.max_length

    def truncate(row: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length],
                "full_tokens": len(row["input_ids"])}

    encoded = encoded.map(truncate)
    trained = [sum(1 for x in labels if x != IGNORE_INDEX) for labels in encoded["labels"]]
    keep = [i for i, n in enumerate(trained) if n > 0]
    if not keep:
        raise GuardFailure(
            f"every example has all its labels masked: data.max_length={max_length} ends before the first trained "
            "token of every row, so the loss would see no token (loss 0.0 / NaN); fix: raise data.max_length"
        )
    stats = _stats(encoded, trained, len(encoded) - len(keep), max_length)
    train, evaluation = _split(encoded.select(keep).select_columns(["input_ids", "labels"]), cfg, seed)
    stats.train_rows, stats.eval_rows = len(train), len(evaluation) if evaluation is not None else 0
    return InstructionData(train, evaluation, stats)


# ---------------------------------------------------------------- generation


def generation_prompt_ids(text: str, style: str, tokenizer: Any, cfg: DataConfig) -> list[int]:
    """The token ids a prompt is generated from, in the format the run trained on: a user turn and the
    assistant's generation prompt through the chat template, the dolly template, or the plain text."""
    if style == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    rendered = render_prompt({"instruction": text, "context": ""}, cfg) if style == "dolly" else text
    return prompt_ids(rendered, tokenizer)  # as training encoded it: one BOS
