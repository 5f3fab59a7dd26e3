"""Safety: secrets never written, safetensors only, no remote code unless asked, run names confined."""

from __future__ import annotations

import json
import secrets as stdlib_secrets
import string

import pytest
import torch

from peftlab.config import ModelConfig, builtin_recipes, load_recipe
from peftlab.errors import PeftlabError
from peftlab.models import loader
from peftlab.runs import RunDir
from peftlab.secrets import redact


def random_token(prefix: str, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return prefix + "".join(stdlib_secrets.choice(alphabet) for _ in range(n))


def test_secrets_never_reach_a_run_folder_or_the_console(cli, runs_dir, fast_sets, monkeypatch):
    hf = random_token("hf_", 34)
    wandb = random_token("", 40, "0123456789abcdef")  # no recognisable shape: caught as an env value
    password = random_token("pw-", 12)
    openai = random_token("sk-", 32)
    monkeypatch.setenv("HF_TOKEN", hf)
    monkeypatch.setenv("WANDB_API_KEY", wandb)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", password)
    prompts = json.dumps([f"Log in with {wandb} and {password}.", f"My key is {openai}, ok?"])
    code, lines = cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", f"eval.prompts={prompts}",
                      "--set", "train.save_steps=3", "--runs-dir", str(runs_dir), "--name", f"exp-{hf}")
    assert code == 0, lines[-3:]

    (run_path,) = [p for p in runs_dir.iterdir() if p.is_dir()]  # beside it: the registry index, grepped too
    assert run_path.name.startswith("exp-") and "redacted" in run_path.name  # a secret never becomes a folder name
    files = [p for p in runs_dir.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in files) and any(p.name == "generations.jsonl" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (hf, wandb, password, openai):
            assert secret.encode() not in data, (path, secret[:6])
    console = "\n".join(lines)
    assert all(secret not in console for secret in (hf, wandb, password, openai))
    config = (run_path / "config.yaml").read_text()
    assert "<redacted:WANDB_API_KEY>" in config and "<redacted:MY_SERVICE_PASSWORD>" in config
    assert "<redacted>" in config  # the sk- key, by its shape

    # Weights (adapter, checkpoints) are safetensors only. The Trainer's own state files are torch zips that
    # it reads back with weights_only=True (no code runs); training_args.bin is never read back.
    assert (run_path / "adapter" / "adapter_model.safetensors").is_file()
    pickles = {p.name for p in files if p.suffix in loader.PICKLE_SUFFIXES}
    assert pickles <= {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}


def test_redaction_has_no_false_positives(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsefalse")  # a TOKEN-ish name that is no secret
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to redact without mangling text
    for path in builtin_recipes().values():
        text = load_recipe(str(path)).to_yaml()
        assert redact(text) == text
    record = json.dumps({"kind": "train", "step": 3, "tokens": 123456789, "trained_tokens": 98765432, "loss": 1.5})
    assert redact(record) == record
    assert redact("the secret ingredient is a token gesture") == "the secret ingredient is a token gesture"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345", "Authorization: Bearer "),
        ("https://user:hunter22@example.com/repo.git", "https://"),
        ('{"hub_token": "abcd1234efgh"}', '{"hub_token": "'),
        ("password=opensesame99", "password="),
        ("key AKIAABCDEFGHIJKLMNOP in a log", "key "),
        ("ghp_" + "a" * 36, ""),
    ],
)
def test_redaction_patterns(text, kept):
    out = redact(text)
    assert out.startswith(kept) and "<redacted>" in out


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/abs/path", "a/../../b", "~/.ssh/id", "..\\..\\win", "ok name"])
def test_run_names_stay_inside_the_runs_folder(runs_dir, tiny_recipe, name):
    run = RunDir.create(runs_dir, name, tiny_recipe())
    assert run.path.resolve().parent == runs_dir.resolve()
    assert run.config_path.is_file()


@pytest.mark.parametrize("name", ["..", "/", "...///"])
def test_unusable_run_names_are_refused(runs_dir, tiny_recipe, name):
    with pytest.raises(PeftlabError, match="no usable characters"):
        RunDir.create(runs_dir, name, tiny_recipe())


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    preset = loader.load_causal_lm(ModelConfig(source="preset:tiny-gemma2"), torch.float32, "eager")
    folder = tmp_path / "pickled-model"
    preset.config.save_pretrained(folder)
    torch.save(preset.state_dict(), folder / "pytorch_model.bin")

    with pytest.raises(PeftlabError, match=r"pickled \(pytorch_model\.bin\).*model\.allow_pickle: true"):
        loader.load_causal_lm(ModelConfig(source=str(folder)), torch.float32, "eager")
    allowed = loader.load_causal_lm(ModelConfig(source=str(folder), allow_pickle=True), torch.float32, "eager")
    assert torch.equal(allowed.model.embed_tokens.weight, preset.model.embed_tokens.weight)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(PeftlabError, match="adapter"):
        loader.refuse_pickled_weights(adapter, allow_pickle=False, field="adapter")


def test_remote_code_never_runs_unless_the_recipe_allows_it(tmp_path):
    folder = tmp_path / "custom-model"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "peftlab_custom",
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"},
    }))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(PeftlabError, match="model.trust_remote_code"):
        loader.load_model_config(ModelConfig(source=str(folder)))
    assert not marker.exists()


STRUCTURAL = {  # credential words in structural fields: redacting any of them would break the recipe
    "data.template": "Auth token: {instruction}\nPassword: {context}\n### Response:\n",
    "data.context_block": "secret=context {context}\n",
    "data.columns": {"response": "api_key: answer"},
    "data.source": "data/token=abcdefgh/rows.jsonl",
    "data.classify.labels": ["password: forgotten", "card_arrival"],
    "model.source": "models/passwd=abcdefgh",
}


def test_redaction_never_changes_a_structural_field(tiny_recipe, runs_dir):
    from peftlab.config import with_overrides

    recipe = with_overrides(tiny_recipe(), STRUCTURAL)
    run = RunDir.create(runs_dir, "structural", recipe)
    saved = load_recipe(str(run.config_path))
    assert saved == recipe  # the recipe round-trips exactly: --resume and generate read this file
    assert "Auth token: {instruction}" in run.config_path.read_text()


def test_secrets_in_prose_fields_are_redacted_and_in_structural_ones_refused(tiny_recipe, runs_dir, monkeypatch):
    from peftlab.config import with_overrides

    hf = random_token("hf_", 34)
    run = RunDir.create(runs_dir, "prose", with_overrides(tiny_recipe(), {"eval.prompts": [f"use {hf} please"]}))
    assert "use <redacted> please" in run.config_path.read_text() and hf not in run.config_path.read_text()
    with pytest.raises(PeftlabError, match=r"^data\.source: holds a secret .*fix: pass credentials through the environment"):
        RunDir.create(runs_dir, "structural", with_overrides(tiny_recipe(), {"data.source": f"https://u:{hf}@host/x.jsonl"}))
    assert not (runs_dir / "structural").exists()


def test_a_template_with_credential_words_trains_resumes_and_generates(cli, runs_dir, fast_sets):
    template = "Auth token: {instruction}\n### Response:\n"
    sets = [*fast_sets, "--set", f"data.template={json.dumps(template)}", "--set", "train.save_steps=3"]
    code, lines = cli("train", "tiny-gemma2-dolly", *sets, "--runs-dir", str(runs_dir), "--name", "auth")
    assert code == 0, lines[-3:]
    assert load_recipe(str(runs_dir / "auth" / "config.yaml")).data.template == template
    code, lines = cli("generate", "auth", "--prompt", "Name a color.", "--max-new-tokens", "2", "--runs-dir", str(runs_dir))
    assert code == 0, lines[-3:]
    # --resume compares the given recipe with config.yaml first: it must pass that check (and then stop
    # only because this run is complete), not refuse the recipe as "differs from the one the run was started with"
    code, lines = cli("train", "tiny-gemma2-dolly", *sets, "--resume", "auth", "--runs-dir", str(runs_dir))
    assert code == 2 and len(lines) == 1 and "already completed" in lines[0], lines
