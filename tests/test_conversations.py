"""Conversation data for SFT: messages, ShareGPT and prompt/completion rows are tokenized by TRL with the exact
expected mask (only assistant / completion tokens and their end-of-turn trained, every system and user token -100),
formats are detected or forced, the template is named, the doctor marks the trained turns, bad rows are one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import one_line_error

from peftlab.config import ModelConfig
from peftlab.data.conversations import ZEPHYR_TEMPLATE, build_sft_data, generation_prompt_ids
from peftlab.data.instructions import IGNORE_INDEX
from peftlab.errors import PeftlabError
from peftlab.models.loader import load_tokenizer

EOS = "<|endoftext|>"  # the tiny twin's bundled BPE: EOS (and pad), no BOS added, no chat template
CONVERSATIONS = [
    [("system", "You are terse."), ("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one?"),
     ("assistant", "Green, then red.")],
    [("user", "What is two plus two?"), ("assistant", "Four.")],
    [("system", "Answer in French."), ("user", "Say hello."), ("assistant", "Bonjour !")],
    [("user", "Count to three."), ("assistant", "1 2 3"), ("user", "Thanks."), ("assistant", "You are welcome.")],
]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def messages_rows(key: str = "messages") -> list[dict]:
    return [{key: [{"role": r, "content": c} for r, c in conv]} for conv in CONVERSATIONS]


def sharegpt_rows() -> list[dict]:
    return [{"conversations": [{"from": SHAREGPT_FROM[r], "value": c} for r, c in conv]} for conv in CONVERSATIONS]


@pytest.fixture
def tokenizer():
    return load_tokenizer(ModelConfig(source="preset:tiny-gemma2"))


@pytest.fixture
def data_cfg(tiny_recipe):
    """The tiny twin's data section for a file: every row, no eval split (rows stay whole and countable)."""

    def make(source: str, **changes):
        return tiny_recipe({"data.source": source, "data.eval_fraction": 0.0, "data.max_samples": None,
                            **{f"data.{k}": v for k, v in changes.items()}}).data

    return make


def expected_zephyr(tokenizer, conversation: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """The Zephyr layout written out segment by segment: each assistant turn's content + EOS trained, the rest
    (system and user turns, role headers, newlines) -100."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, trained: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

    for role, content in conversation:
        if role == "assistant":
            add("<|assistant|>\n", False)
            add(content + EOS, True)
            add("\n", False)
        else:
            add(f"<|{role}|>\n{content}{EOS}\n", False)
    return ids, labels


def encoded_rows(data) -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    return {(tuple(i), tuple(lab)) for i, lab in zip(data.train["input_ids"], data.train["labels"], strict=True)}


# ---------------------------------------------------------------- the exact masks


def test_messages_train_exactly_the_assistant_turns_and_their_eos(tokenizer, data_cfg, tmp_path):
    cfg = data_cfg(write_jsonl(tmp_path / "chat.jsonl", messages_rows()))
    data, fmt, notes = build_sft_data(cfg, tokenizer, seed=0)
    expected = {tuple(map(tuple, expected_zephyr(tokenizer, conv))) for conv in CONVERSATIONS}
    assert encoded_rows(data) == expected
    assert (fmt.name, fmt.detected, fmt.prompt_style) == ("messages", "auto: columns messages", "chat")
    assert fmt.template.startswith("zephyr (peftlab's default") and "assistant_only_loss" in fmt.loss
    assert notes == []  # EOS ends the assistant turn inside the mask: TRL's stop-token check passes
    # The serving template (no generation tag) is what the tokenizer keeps, and so what the adapter folder saves.
    assert tokenizer.chat_template == ZEPHYR_TEMPLATE and "{% generation %}" not in tokenizer.chat_template
    trained = sum(1 for labels in data.train["labels"] for x in labels if x != IGNORE_INDEX)
    assert data.stats.trained_tokens == trained and data.stats.rows == len(CONVERSATIONS)


def test_sharegpt_maps_human_and_gpt_to_the_same_examples_as_messages(tokenizer, data_cfg, tmp_path):
    messages = build_sft_data(data_cfg(write_jsonl(tmp_path / "m.jsonl", messages_rows())), tokenizer, seed=0)[0]
    data, fmt, _ = build_sft_data(data_cfg(write_jsonl(tmp_path / "s.jsonl", sharegpt_rows())), tokenizer, seed=0)
    assert fmt.name == "sharegpt" and fmt.detected == "auto: columns conversations"
    assert encoded_rows(data) == encoded_rows(messages)


def test_plain_prompt_completion_trains_the_completion_and_eos(tokenizer, data_cfg, tmp_path):
    rows = [{"prompt": "Question: name a colour.\nAnswer:", "completion": " Blue."},
            {"prompt": "Question: two plus two?\nAnswer:", "completion": " Four."}]
    data, fmt, _ = build_sft_data(data_cfg(write_jsonl(tmp_path / "pc.jsonl", rows)), tokenizer, seed=0)
    expected = set()
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["completion"] + EOS)["input_ids"]
        assert full[: len(prompt)] == prompt
        expected.add((tuple(full), tuple([IGNORE_INDEX] * len(prompt) + full[len(prompt):])))
    assert encoded_rows(data) == expected
    assert (fmt.name, fmt.prompt_style) == ("prompt_completion", "text") and fmt.template.startswith("none")
    assert tokenizer.chat_template is None  # plain text: no template is set or saved


def test_conversational_prompt_completion_trains_the_rendered_completion(tokenizer, data_cfg, tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
             "completion": [{"role": "assistant", "content": "Blue."}]}]
    data, fmt, _ = build_sft_data(data_cfg(write_jsonl(tmp_path / "pcc.jsonl", rows)), tokenizer, seed=0)
    ids, labels = expected_zephyr(tokenizer, [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue.")])
    # completion_only_loss: everything after the prompt (which ends with the `<|assistant|>\n` generation prompt),
    # that is the answer, its EOS and the template's newline after it.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert encoded_rows(data) == {(tuple(ids), tuple(labels[:-len(newline)] + newline))}
    assert (fmt.name, fmt.prompt_style) == ("prompt_completion", "chat") and "completion_only_loss" in fmt.loss


def test_a_model_template_without_generation_markers_uses_trls_training_variant(tokenizer, data_cfg, tmp_path):
    from trl.chat_template_utils import gemma_chat_template

    tokenizer.chat_template = gemma_chat_template  # Gemma's own: no {% generation %} markers
    rows = [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}]
    data, fmt, notes = build_sft_data(data_cfg(write_jsonl(tmp_path / "g.jsonl", rows)), tokenizer, seed=0)
    (ids, labels), = encoded_rows(data)
    trained = [x for x in labels if x != IGNORE_INDEX]
    masked = [i for i, x in zip(ids, labels, strict=True) if x == IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Blue.<end_of_turn>\n"
    # Gemma's template starts with BOS (this tokenizer's BOS is its EOS text)
    assert tokenizer.decode(masked) == f"{EOS}<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    assert fmt.template == "the model's chat template, with TRL's training variant (generation markers) for the mask"
    assert tokenizer.chat_template == gemma_chat_template  # the serving template stays the model's
    # <end_of_turn> is plain text to this tokenizer, not a special token: TRL's stop-token check says so.
    assert len(notes) == 1 and "end-of-turn token" in notes[0]


def test_generation_prompt_follows_the_trained_format(tokenizer, data_cfg, tmp_path):
    build_sft_data(data_cfg(write_jsonl(tmp_path / "chat.jsonl", messages_rows())), tokenizer, seed=0)
    ids = generation_prompt_ids("Name a colour.", "chat", tokenizer, data_cfg("bundled:dolly15k"))
    assert tokenizer.decode(ids) == f"<|user|>\nName a colour.{EOS}\n<|assistant|>\n"
    assert tokenizer.decode(generation_prompt_ids("Hi", "text", tokenizer, data_cfg("bundled:dolly15k"))) == "Hi"


# ---------------------------------------------------------------- detection and aliases


def test_data_columns_map_each_format_and_data_format_forces_one(tokenizer, data_cfg, tmp_path):
    reference = encoded_rows(build_sft_data(data_cfg(write_jsonl(tmp_path / "m.jsonl", messages_rows())), tokenizer, 0)[0])
    chat = write_jsonl(tmp_path / "chat.jsonl", messages_rows("chat"))
    data, fmt, _ = build_sft_data(data_cfg(chat, columns={"messages": "chat"}), tokenizer, seed=0)
    assert (fmt.name, fmt.detected) == ("messages", "data.columns") and encoded_rows(data) == reference
    dialog = write_jsonl(tmp_path / "d.jsonl", [{"dialog": r["conversations"]} for r in sharegpt_rows()])
    data, fmt, _ = build_sft_data(data_cfg(dialog, columns={"conversations": "dialog"}), tokenizer, seed=0)
    assert fmt.name == "sharegpt" and encoded_rows(data) == reference
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q:", "answer": " A."}])
    data, fmt, _ = build_sft_data(data_cfg(qa, columns={"prompt": "question", "completion": "answer"}), tokenizer, 0)
    assert fmt.name == "prompt_completion"
    assert tokenizer.decode([x for x in data.train["labels"][0] if x != IGNORE_INDEX]) == " A." + EOS
    # Both formats' columns in one file: data.format picks one.
    both = write_jsonl(tmp_path / "both.jsonl", [{**m, "prompt": "Q:", "completion": " A."} for m in messages_rows()])
    data, fmt, _ = build_sft_data(data_cfg(both, format="messages"), tokenizer, seed=0)
    assert (fmt.name, fmt.detected) == ("messages", "data.format") and encoded_rows(data) == reference


def test_dolly_files_and_the_bundled_data_stay_dolly(tokenizer, data_cfg, tmp_path):
    _, fmt, _ = build_sft_data(data_cfg("bundled:dolly15k", max_samples=8), tokenizer, seed=0)
    assert (fmt.name, fmt.template, fmt.prompt_style) == ("dolly", "dolly (data.template)", "dolly")
    rows = [{"instruction": "Name a colour.", "response": "Blue."}] * 2
    _, fmt, _ = build_sft_data(data_cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer, seed=0)
    assert (fmt.name, fmt.detected) == ("dolly", "auto: columns instruction, response")


# ---------------------------------------------------------------- bad input: one line each


def bad(cases: dict[str, tuple[list[dict], dict, tuple[str, ...]]]):
    return pytest.mark.parametrize(("rows", "sets", "needles"), list(cases.values()), ids=list(cases))


@bad({
    "unknown role": ([{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}], {},
                     ("column 'messages' row 1 message 0: unknown role 'human'", "data.format=sharegpt", "fix:")),
    "no assistant turn": ([{"messages": [{"role": "user", "content": "Hi"}]}], {},
                          ("row 1", "has no assistant turn", "fix: add the assistant's answer")),
    "sharegpt from": ([{"conversations": [{"from": "bot", "value": "Hi"}]}], {},
                      ("column 'conversations' row 1 message 0: unknown 'from' value 'bot'", "human, gpt", "fix:")),
    "sharegpt no gpt turn": ([{"conversations": [{"from": "human", "value": "Hi"}]}], {},
                             ("has no gpt turn", "fix:")),
    "mixed columns": ([{"messages": [{"role": "user", "content": "Hi"}]}, {"prompt": "Q", "completion": "A"}], {},
                      ("more than one data format", "messages (columns messages)",
                       "prompt_completion (columns prompt, completion)", "fix: keep one format per file")),
    "mixed rows forced": ([{"messages": [{"role": "assistant", "content": "Hi"}]}, {"prompt": "Q", "completion": "A"}],
                          {"data.format": "messages"}, ("column 'messages' row", "holds nothing", "fix:")),
    "messages as text": ([{"messages": "hello"}], {}, ("row 1: holds str, not a list of messages", "fix:")),
    "role keys missing": ([{"messages": [{"from": "human", "value": "Hi"}]}], {},
                          ("no 'role' (found: from, value)", "data.format=sharegpt")),
    "prompt text, completion list": ([{"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}], {},
                                     ("column 'prompt' row 1: prompt is str, completion is list", "fix: both text")),
    "every answer empty": ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}], {},
                           ("every assistant turn is empty", "fix:")),
    "empty file": ([], {"data.format": "messages"}, ("holds no rows", "fix:")),
    "alias to a missing column": ([{"chat": []}], {"data.columns": '{"messages": "dialog"}'},
                                  ("column 'dialog' (for messages) not found", "columns found: chat")),
    "unknown template": ([{"messages": [{"role": "assistant", "content": "A"}]}], {"data.chat_template": "chatml"},
                         ("data.chat_template: 'chatml'", "fix:")),
})
def test_bad_conversation_data_is_one_line(cli, runs_dir, fast_sets, tmp_path, rows, sets, needles):
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    args = [a for k, v in {"data.source": source, **sets}.items() for a in ("--set", f"{k}={v}")]
    one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, *args, "--runs-dir", str(runs_dir)), *needles)


def test_a_row_the_chat_template_refuses_is_named(tokenizer, data_cfg, tmp_path):
    from trl.chat_template_utils import gemma_chat_template

    tokenizer.chat_template = gemma_chat_template  # refuses a system turn and non-alternating roles
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A"}]}]
    with pytest.raises(PeftlabError, match=r"row 2: the chat template refused it \(System role not supported\)"):
        build_sft_data(data_cfg(write_jsonl(tmp_path / "g.jsonl", rows)), tokenizer, seed=0)


def test_a_template_without_markers_that_trl_cannot_patch_is_refused(tokenizer, data_cfg, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    cfg = data_cfg(write_jsonl(tmp_path / "m.jsonl", messages_rows()), chat_template=str(template))
    with pytest.raises(PeftlabError, match=r"no \{% generation %\} markers.*fix: data.chat_template=PATH.jinja"):
        build_sft_data(cfg, tokenizer, seed=0)


# ---------------------------------------------------------------- training on the tiny twin


PLAIN_ROWS = [{"prompt": f"Question: what is {a} plus {a}?\nAnswer:", "completion": f" {2 * a}."} for a in range(1, 5)]


def expected_plain(tokenizer, row: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    prompt = tokenizer(row["prompt"])["input_ids"]
    full = tokenizer(row["prompt"] + row["completion"] + EOS)["input_ids"]
    return tuple(full), tuple([IGNORE_INDEX] * len(prompt) + full[len(prompt):])


@pytest.mark.parametrize("name", ["messages", "sharegpt", "prompt_completion"])
def test_each_format_trains_on_the_tiny_twin_with_exactly_the_expected_labels(tmp_path, tiny_recipe, tokenizer, name,
                                                                             monkeypatch, cli):
    from peftlab.engines.hf import CountingSFTTrainer
    from peftlab.runner import run_recipe
    from peftlab.tasks import sft

    rows = {"messages": messages_rows(), "sharegpt": sharegpt_rows(), "prompt_completion": PLAIN_ROWS}[name]
    expected = ({expected_plain(tokenizer, r) for r in PLAIN_ROWS} if name == "prompt_completion"
                else {tuple(map(tuple, expected_zephyr(tokenizer, conv))) for conv in CONVERSATIONS})
    recipe = tiny_recipe({"data.source": write_jsonl(tmp_path / "data.jsonl", rows), "data.eval_fraction": 0.25,
                          "train.max_steps": 2, "train.logging_steps": 1})
    consumed = []
    training_step = CountingSFTTrainer.training_step

    def spy_step(self, model, inputs, num_items_in_batch=None):
        for ids, labels, mask in zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"], strict=True):
            n = int(mask.sum())  # padding is on the right
            consumed.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
            assert set(labels[n:].tolist()) <= {IGNORE_INDEX}
        return training_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(CountingSFTTrainer, "training_step", spy_step)
    run = run_recipe(recipe, tmp_path / "runs", name, show_progress=False)
    summary = run.summary()
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["data_format"]["name"] == name and summary["eval_loss"] is not None
    # 3 train rows (1 of 4 for eval), batch 2: step 1 trains two, step 2 the third; each exactly as expected.
    assert len(consumed) == len(set(consumed)) == 3 and set(consumed) <= expected
    chat = name != "prompt_completion"
    assert summary["data_format"]["prompt_style"] == ("chat" if chat else "text")
    saved = run.adapter_path / "chat_template.jinja"
    assert (saved.read_text() == ZEPHYR_TEMPLATE) if chat else not saved.exists()
    # `peftlab generate` renders the prompt as the run trained (the style the summary records).
    styles = []
    monkeypatch.setattr(sft, "generation_prompt_ids", lambda *a: styles.append(a[1]) or generation_prompt_ids(*a))
    code, lines = cli("generate", str(run.path), "--prompt", "Name a colour.", "--max-new-tokens", "2")
    assert code == 0 and styles == [summary["data_format"]["prompt_style"]], lines


def test_doctor_marks_each_assistant_turn_of_a_conversation(cli_out, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Count to {n}."},
                          {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))},
                          {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Welcome."}]}
            for n in range(1, 9)]
    code, lines = cli_out("doctor", "tiny-gemma2-dolly", "--set", f"data.source={write_jsonl(tmp_path / 'c.jsonl', rows)}")
    assert code == 0 and lines[-1] == "doctor: healthy", "\n".join(lines)
    assert "data format: messages (auto: columns messages); template: zephyr" in "\n".join(lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("example: "))
    blocks = [line for line in lines[start + 1:] if line.startswith(("  masked  | ", "  TRAINED | "))]
    # system, user and the role headers masked; each answer with its EOS trained; the newline after it masked
    assert blocks[0] == "  masked  | <|system|>"
    assert [b[:11] for b in blocks] == ["  masked  |", "  TRAINED |", "  masked  |", "  TRAINED |", "  masked  |"]
    assert blocks[3] == f"  TRAINED | Welcome.{EOS}" and blocks[1].endswith(EOS)
    answer = blocks[1].removeprefix("  TRAINED | ").removesuffix(EOS)
    trained = int(re.fullmatch(r"example: \d+ prompt tokens masked \(-100\), (\d+) tokens trained", lines[start])[1])
    assert trained == len(tokenizer_ids(answer + EOS)) + len(tokenizer_ids("Welcome." + EOS))
    assert re.search(r"label tokens over 8 rows: \d+ trained, \d+ masked", "\n".join(lines))


def tokenizer_ids(text: str) -> list[int]:
    return load_tokenizer(ModelConfig(source="preset:tiny-gemma2"))(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- property test


role_values = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", ""]) | st.text(max_size=5)
contents = st.none() | st.text(max_size=20) | st.integers() | st.lists(st.text(max_size=3), max_size=2)
turns = st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), role_values | contents,
                                 max_size=3), max_size=4)
cells = st.none() | turns | st.text(max_size=10)
conversation_rows = st.lists(st.dictionaries(st.sampled_from(["messages", "conversations", "prompt", "completion"]),
                                             cells, max_size=2), max_size=5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=conversation_rows, name=st.sampled_from(["auto", "messages", "sharegpt", "prompt_completion"]))
def test_random_conversation_files_give_examples_or_one_line(tiny_recipe, tmp_path_factory, rows, name):
    tokenizer = load_tokenizer(ModelConfig(source="preset:tiny-gemma2"))  # each example sets its own chat template
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_recipe({"data.source": str(path), "data.format": name, "data.eval_fraction": 0.0}).data
    try:
        data, _, _ = build_sft_data(cfg, tokenizer, seed=0)
    except PeftlabError as exc:
        assert "\n" not in str(exc)
        return
    for labels in data.train["labels"]:
        assert len(labels) <= cfg.max_length and any(x != IGNORE_INDEX for x in labels)
