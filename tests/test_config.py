"""Recipes: defaults resolved, overrides typed, and every bad recipe a one-line error naming the key and a fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from peftlab.config import builtin_recipes, load_recipe, validate_recipe, with_overrides
from peftlab.errors import PeftlabError


def test_builtin_recipes_hold_the_original_experiment():
    assert {"gemma2-dolly", "tiny-gemma2-dolly"} <= set(builtin_recipes())
    r = load_recipe("gemma2-dolly")
    assert (r.model.source, r.data.max_length, r.train.epochs, r.train.batch_size, r.train.grad_accum) == (
        "google/gemma-2-2b", 768, 1.5, 1, 8)
    assert (r.train.lr, r.train.scheduler, r.method.lora.r, r.method.lora.alpha, r.method.lora.dropout) == (
        2e-4, "cosine", 16, 32, 0.05)
    assert r.method.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert r.train.gradient_checkpointing and r.data.eval_fraction == 0.01


def test_resolved_recipe_round_trips_with_every_default(tmp_path):
    recipe = load_recipe("tiny-gemma2-dolly", ["train.lr=1e-4", "method.name=qlora"])
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    saved = yaml.safe_load(path.read_text())
    assert saved["method"]["quant"]["type"] == "nf4"  # a default the YAML file never mentions
    again = load_recipe(str(path))
    assert again == recipe and again.config_hash() == recipe.config_hash()


def test_overrides_are_parsed_and_typed():
    recipe = load_recipe("tiny-gemma2-dolly", ["train.lr=1e-4", "train.max_steps=7", "method.lora.target_modules=[q_proj]",
                                               "eval.prompts=[\"Hi: there?\"]"])
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 7
    assert recipe.method.lora.target_modules == ["q_proj"]
    assert recipe.eval.prompts == ["Hi: there?"]
    assert with_overrides(recipe, {"train.max_steps": None}).train.max_steps is None


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1e-4", "unknown key 'train.lrr'; fix: did you mean 'train.lr'?"),
    ("method.lora.rank=8", "unknown key 'method.lora.rank'; fix: did you mean 'method.lora.r'?"),
    ("trian.lr=1e-4", "unknown key 'trian'; fix: did you mean 'train'?"),
    ("train.batch_size=many", "train.batch_size: Input should be a valid integer"),
    ("train.max_steps=1.5", "train.max_steps: Input should be a valid integer"),
    ("method.name=qlor", "method.name: Input should be 'lora' or 'qlora'"),
    ("train.lr=0", "train.lr: Input should be greater than 0"),
    ("train.lr=-1e-4", "train.lr: Input should be greater than 0"),
    ("method.lora.r=0", "method.lora.r: Input should be greater than 0"),
    ("method.lora.dropout=1.0", "method.lora.dropout: Input should be less than 1"),
    ("method.lora.dropout=-0.1", "method.lora.dropout: Input should be greater than or equal to 0"),
    ("train.epochs=0", "train.epochs: Input should be greater than 0"),
    ("data.max_length=0", "data.max_length: Input should be greater than 0"),
    ("train.lr", "--set 'train.lr': expected KEY=VALUE"),
    ("train.lr.x=1", "--set 'train.lr.x=1': 'lr' is a value, not a section"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(PeftlabError) as info:
        load_recipe("tiny-gemma2-dolly", [override])
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  lr: 1.0e-4\n   batch_size: 2\n")
    with pytest.raises(PeftlabError, match=r"bad\.yaml: malformed YAML at line 4"):
        load_recipe(str(path))


def test_unknown_recipe_and_non_mapping(tmp_path):
    with pytest.raises(PeftlabError, match="did you mean 'tiny-gemma2-dolly'"):
        load_recipe("tiny-gemma2-doly")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(PeftlabError, match="a recipe must be a YAML mapping, found list"):
        load_recipe(str(path))
    with pytest.raises(PeftlabError, match="data.template must contain"):
        validate_recipe({"data": {"template": "no placeholder"}})


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n"])
def test_empty_recipe_file_is_an_error_not_the_defaults(text, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(PeftlabError, match=r"empty\.yaml: the recipe file is empty; fix: "):
        load_recipe(str(path))


@pytest.mark.parametrize("override, line", [
    # a choice list is the whole fix, not its first item ("must be 'auto'" was all it said)
    ("diffusion.speed.compile=maybe", "--set diffusion.speed.compile=maybe: diffusion.speed.compile: Input should be "
     "'auto', True or False (got \"maybe\"); fix: diffusion.speed.compile must be 'auto', True or False"),
    ("train.lr=abc", "; fix: train.lr must be a valid number"),
    ("diffusion.speed=turbo", "; fix: diffusion.speed is a section: set its keys (channels_last, micro_batch"),
    ("foo.bar=1", "--set foo.bar=1: unknown key 'foo'; fix: use one of data, "),  # the flag, not the recipe file
])
def test_bad_set_value_names_the_flag_and_a_whole_fix(override, line):
    with pytest.raises(PeftlabError) as err:
        load_recipe("tiny-sd-vangogh", [override])
    assert line in str(err.value) and str(err.value).startswith(f"--set {override}: ")


def test_what_was_found_comes_before_a_validators_own_fix():
    with pytest.raises(PeftlabError) as err:  # it read `...; fix: use one of classify, diffusion, sft (got "nope")`
        validate_recipe({"task": "nope"})
    assert str(err.value) == 'recipe: task: unknown task \'nope\' (got "nope"); fix: use one of classify, diffusion, sft'


def test_a_section_check_names_the_recipe_not_an_unrelated_flag_under_it():
    with pytest.raises(PeftlabError) as err:
        load_recipe("tiny-dialogpt-banking77", ["train.max_steps=12", "train.save_steps=2"])
    assert "tiny-dialogpt-banking77.yaml: train.best_metric needs train.eval_steps" in str(err.value)
    assert not str(err.value).startswith("--set train.max_steps")  # what the first version of the --set rule said
    # the fix keeps the user's own save interval (it suggested 50/100 for a 12-step run)
    assert str(err.value).endswith("fix: e.g. --set train.eval_steps=2 --set train.save_steps=2")


@pytest.mark.parametrize("args, expected", [
    (["--set", "train.lrr=1e-4"], "did you mean 'train.lr'?"),
    (["--set", "method.lora.dropout=1.5"], "method.lora.dropout"),
    (["--set", "train.lr"], "expected KEY=VALUE"),
    (["BAD_YAML"], "malformed YAML at line 3"),
])
def test_cli_bad_recipe_is_one_error_line_exit_2(args, expected, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n lr: 1\n  x: 2\n")
    recipe = [str(bad)] if args == ["BAD_YAML"] else ["tiny-gemma2-dolly", *args]
    proc = subprocess.run([sys.executable, "-m", "peftlab", "train", *recipe, "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120)
    output = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2
    assert len(output) == 1 and output[0].startswith("error: ") and expected in output[0], output
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("override, field, value", [
    ("learning_rate=1e-3", "train.lr", 1e-3),
    ("train.learning_rate=1e-3", "train.lr", 1e-3),
    ("per_device_train_batch_size=4", "train.batch_size", 4),
    ("micro_batch_size=4", "train.batch_size", 4),
    ("gradient_accumulation_steps=2", "train.grad_accum", 2),
    ("num_train_epochs=2", "train.epochs", 2.0),
    ("lr_scheduler_type=linear", "train.scheduler", "linear"),
    ("metric_for_best_model=loss", "train.best_metric", "eval_loss"),
    ("bf16=true", "train.precision", "bf16"),
    ("max_seq_length=99", "data.max_length", 99),
    ("lora_r=4", "method.lora.r", 4),
    ("lora_alpha=8", "method.lora.alpha", 8),
    ("lora_dropout=0.2", "method.lora.dropout", 0.2),
    ("lora_target_modules=[q_proj]", "method.lora.target_modules", ["q_proj"]),
    ("adapter=qlora", "method.name", "qlora"),
    ("load_in_4bit=true", "method.name", "qlora"),
    ("bnb_4bit_compute_dtype=bfloat16", "method.quant.compute_dtype", "bf16"),
    ("model_name_or_path=preset:tiny-gpt2", "model.source", "preset:tiny-gpt2"),
    ("logging_steps=3", "train.logging_steps", 3),
])
def test_standard_names_are_aliases_of_our_fields(override, field, value):
    recipe = load_recipe("tiny-gemma2-dolly", [override, "eval_steps=6", "save_steps=6"])
    node = recipe
    for part in field.split("."):
        node = getattr(node, part)
    assert node == value
    assert "learning_rate" not in recipe.to_yaml()  # the saved recipe speaks our names only


def test_aliases_in_a_yaml_file_and_our_name_from_set_wins(tmp_path):
    path = tmp_path / "hf-style.yaml"
    path.write_text("base_model: preset:tiny-gemma2\nlearning_rate: 3.0e-4\nlora_alpha: 8\n"
                    "train:\n  gradient_accumulation_steps: 2\n")
    recipe = load_recipe(str(path), ["train.lr=1e-4"])
    assert (recipe.model.source, recipe.train.lr, recipe.method.lora.alpha, recipe.train.grad_accum) == (
        "preset:tiny-gemma2", 1e-4, 8, 2)


@pytest.mark.parametrize("data, expected", [
    ({"learning_rate": 1e-3, "train": {"lr": 2e-3}}, "'learning_rate' and 'train.lr' are the same field"),
    ({"bf16": False}, "bf16: only `bf16: true` has a meaning here"),
    ({"train": {"learning_rat": 1}}, "unknown key 'train.learning_rat'; fix: did you mean 'train.lr'? ('learning_rate'"),
    ({"gradient_accumulation_step": 2}, "did you mean 'train.grad_accum'? ('gradient_accumulation_steps'"),
    ({"train": {"lrr": 1}}, "unknown key 'train.lrr'; fix: did you mean 'train.lr'?"),
    ({"method": {"lora": {"dora": True}}}, "unknown key 'method.lora.dora'; fix: did you mean 'method.lora.use_dora'?"),
])
def test_alias_conflicts_and_hints(data, expected):
    with pytest.raises(PeftlabError) as err:
        validate_recipe(data)
    assert expected in str(err.value)


def test_recipes_show_and_copy_start_a_recipe_of_ones_own(cli, tmp_path):
    code, lines = cli("recipes", "show", "tiny-gemma2-dolly")
    shipped = builtin_recipes()["tiny-gemma2-dolly"].read_text(encoding="utf-8")
    assert code == 0 and lines[0].startswith("#") and lines == [line for line in shipped.splitlines() if line.strip()]
    target = tmp_path / "mine.yaml"
    assert cli("recipes", "copy", "tiny-gemma2-dolly", str(target))[0] == 0
    assert target.read_text(encoding="utf-8") == shipped
    assert load_recipe(str(target), ["train.lr=1e-3"]).train.lr == 1e-3
    code, lines = cli("recipes", "copy", "tiny-gemma2-dolly", str(target))
    assert code == 2 and lines[-1].startswith(f"error: {target}: already exists")
    code, lines = cli("recipes", "show", "tiny-gema2-dolly")
    assert code == 2 and "did you mean 'tiny-gemma2-dolly'?" in lines[-1]
    code, lines = cli("recipes")
    assert code == 0 and any("tiny-gemma2-dolly" in line for line in lines)


def test_trainer_names_that_live_outside_the_recipe_say_where():
    # output_dir was one of them until issue 14 item 2 mapped it to its field (tests/test_output_dir.py)
    with pytest.raises(PeftlabError) as err:
        validate_recipe({"run_name": "hf1", "learning_rate": 1e-4})
    assert "'run_name' is not a recipe field: a run's name is its folder's; fix: remove it and pass `--name hf1`" in str(err.value)
    with pytest.raises(PeftlabError) as err:
        load_recipe("tiny-gemma2-dolly", ["train.logging_dir=out/logs"])
    assert str(err.value).startswith("--set train.logging_dir=out/logs: 'train.logging_dir' is not a recipe field")


@pytest.mark.parametrize("override, expected", [
    ("train.lr=abc", "--set train.lr=abc: train.lr: Input should be a valid number, unable to parse string as a number "
                     "(got \"abc\"); fix: train.lr must be a valid number"),
    ("learning_rate=abc", "--set learning_rate=abc: train.lr: Input should be a valid number"),  # an alias: its flag
    ("method.name=qlor", "--set method.name=qlor: method.name: Input should be 'lora' or 'qlora' (got \"qlor\"); "
                         "fix: method.name must be 'lora' or 'qlora'"),
    ("train.lrr=1", "--set train.lrr=1: unknown key 'train.lrr'; fix: did you mean 'train.lr'?"),
])
def test_a_bad_set_names_the_flag_not_the_installed_recipe_file(override, expected):
    with pytest.raises(PeftlabError) as err:
        load_recipe("tiny-gemma2-dolly", [override])
    assert str(err.value).startswith(expected) and "recipes/tiny-gemma2-dolly.yaml" not in str(err.value)


def test_a_bad_yaml_value_still_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  lr: abc\n")
    with pytest.raises(PeftlabError) as err:
        load_recipe(str(path), ["train.max_steps=3"])  # a --set elsewhere is not blamed
    assert str(err.value).startswith(f"{path}: train.lr: Input should be a valid number")


@pytest.mark.parametrize("args, expected", [
    (["recipes", "show", "nope"], "error: recipe 'nope': not a built-in recipe; fix: use one of demo-gemma2-loss0, demo-gemma3-270m-intents, "),
    (["runs", "--status", "foo"], "error: --status 'foo': unknown; fix: use one of completed, dead, failed, "),
    (["runs", "--status", "complted"], "error: --status 'complted': unknown; fix: did you mean 'completed'?"),
    (["train", "tiny-gemma2-dolly", "--name", "../x"], "error: --name '../x': a run name is one folder inside "
                                                      "--runs-dir, not a path; fix: --name x"),
    (["matrix", "tiny-gemma2-dolly", "--name", "a/b"], "error: --name 'a/b': a run name is one folder"),
    (["sweep", "tiny-dialogpt-banking77", "--study", ".."], "error: --study '..': a run name is one folder"),
])
def test_unknown_names_and_paths_as_names_are_one_line_with_a_fix(cli, tmp_path, args, expected):
    (tmp_path / "runs").mkdir()
    code, lines = cli(*args, "--runs-dir", str(tmp_path / "runs")) if args[0] != "recipes" else cli(*args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert [p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")] == []  # no run, nowhere
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, expected", [
    (["compare", "r", "--format", "jsn"], "error: --format 'jsn': unknown; fix: did you mean 'json'?"),
    (["matrix", "tiny-gemma2-dolly", "--methods", "lora,dora"], "error: --methods 'lora,dora': unknown method ['dora']; fix:"),
    (["train", "tiny-gemma2-dolly", "--set", "train.lr"], "error: --set 'train.lr': expected KEY=VALUE; fix: e.g."),
    (["train", "tiny-gemma2-dolly", "--set", "train.lr.x=1"], "error: --set 'train.lr.x=1': 'lr' is a value, not a "
                                                              "section; fix: set train.lr itself"),
    (["train", "tiny-gemma2-dolly", "--set", "model.source=gguf:gemma-3-27m"],
     "error: model.source 'gguf:gemma-3-27m': unknown packaged GGUF; fix: did you mean 'gemma-3-270m'?"),
])
def test_every_refusal_of_a_name_or_flag_carries_a_fix(cli, tmp_path, args, expected):
    code, lines = cli(*args, "--runs-dir", str(tmp_path))
    assert code == 2 and lines[-1].startswith(expected), lines[-3:]


def test_a_dict_valued_field_is_data_not_a_section_of_aliases():
    """sweep.space's keys are the user's search parameters: an alias name there is not moved to its field."""
    space = {"output_dir": {"type": "categorical", "choices": ["a", "b"]}}
    with pytest.raises(PeftlabError) as err:
        validate_recipe({"model": {"source": "preset:tiny-gemma2"}, "sweep": {"space": space}})
    assert "sweep.space: 'output_dir' is not a recipe field to search" in str(err.value)
    assert "did you mean" not in str(err.value)  # it said "did you mean 'output_dir'?" of 'output_dir' itself
    assert str(err.value).endswith("not what they train; fix: remove it from sweep.space")
    lr = {"type": "float", "low": 1e-4, "high": 1e-3}
    recipe = validate_recipe({"model": {"source": "preset:tiny-gemma2"},  # HF hyperparameter_search's name
                              "sweep": {"space": {"learning_rate": lr, "train.epochs": {"type": "int", "low": 1,
                                                                                         "high": 2}}}})
    assert list(recipe.sweep.space) == ["train.lr", "train.epochs"] and recipe.sweep.space["train.lr"].high == 1e-3
    with pytest.raises(PeftlabError) as err:
        validate_recipe({"model": {"source": "preset:tiny-gemma2"},
                         "sweep": {"space": {"learning_rate": lr, "train.lr": lr}}})
    assert "sweep.space: 'learning_rate' and 'train.lr' are the same field" in str(err.value)


def test_a_section_check_about_the_key_set_names_its_flag():
    """A cross-field check whose message names the --set key blames that flag, not the built-in recipe's file."""
    with pytest.raises(PeftlabError) as err:
        load_recipe("tiny-sd-vangogh", ["diffusion.speed.micro_batch=3", "train.max_steps=2"])
    assert str(err.value).startswith("--set diffusion.speed.micro_batch=3: diffusion.speed.micro_batch 3 does not "
                                     "divide the 4 images"), str(err.value)
