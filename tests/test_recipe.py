import json

import pytest
import yaml

from peftkit.errors import UserError
from peftkit.recipe import apply_override, json_schema, load_recipe, validate

from .conftest import peftkit

BASE = {
    "name": "t",
    "model": {"name": "some/model"},
    "data": {"source": "x.csv"},
    "task": {"type": "classification"},
    "method": {"name": "lora"},
}


def problems(raw: dict) -> str:
    with pytest.raises(UserError) as err:
        validate(raw)
    return str(err.value)


def with_(**changes) -> dict:
    raw = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        apply_override(raw, f"{key.replace('__', '.')}={value}")
    return raw


def test_defaults_are_filled_in():
    recipe = validate(BASE)
    assert recipe.method.r == 8 and recipe.train.epochs == 3 and recipe.data.splits.train == 0.8
    assert str(recipe.output_dir) == "runs/t"


def test_unknown_key_names_its_path_and_a_close_match():
    message = problems(with_(method__rr=4))
    assert "unknown key 'method.rr' (did you mean 'r'?)" in message
    message = problems(with_(train__epoch=2))
    assert "unknown key 'train.epoch' (did you mean 'epochs'?)" in message


def test_wrong_type_says_expected_and_got():
    message = problems(with_(train__epochs="three"))
    assert "train.epochs: expected a valid integer" in message and "'three'" in message


def test_all_errors_reported_at_once():
    raw = with_(train__epochs="three", method__rr=4, data__unknown_labels="ignore")
    del raw["model"]
    message = problems(raw)
    assert "4 problem(s)" in message
    for part in ("train.epochs", "method.rr", "data.unknown_labels", "missing required key 'model'"):
        assert part in message


def test_unknown_method_lists_valid_ones():
    message = problems(with_(method__name="lorra"))
    assert "unknown method 'lorra' (did you mean 'lora'?)" in message and "choose one of: lora" in message


def test_options_of_another_method_are_errors():
    message = problems(with_(method__name="ia3", method__r=8))
    assert "unknown key 'method.r'" in message and "feedforward_modules" in message
    assert "must not exceed init_r" in problems(with_(method__name="adalora", method__init_r=4, method__target_r=8))
    assert "cannot be combined with dora" in problems(with_(method__init="pissa", method__dora=True))


def test_out_of_range_and_cross_field_checks():
    assert "method.r" in problems(with_(method__r=0))
    assert "add up to 1" in problems(with_(data__splits__train=0.9))
    assert "not a metric of task 'classification'" in problems(with_(eval__metric_for_best="f1"))


def test_overrides_are_parsed_as_yaml():
    raw = with_(method__r="16", method__target_modules="[query, value]", train__lr="3e-4")
    recipe = validate(raw)
    assert recipe.method.r == 16 and recipe.method.target_modules == ["query", "value"] and recipe.train.lr == 3e-4
    with pytest.raises(UserError, match="not of the form"):
        apply_override({}, "train.epochs")


def test_file_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match="the recipe is empty"):
        load_recipe(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_name_defaults_to_file_name(tmp_path):
    path = tmp_path / "my-run.yaml"
    raw = dict(BASE)
    del raw["name"]
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).name == "my-run"


def test_resolved_recipe_round_trips():
    recipe = validate(with_(method__r=4))
    assert validate(yaml.safe_load(recipe.to_yaml())) == recipe


def test_schema_is_json_schema_with_every_section():
    schema = json.loads(json_schema())
    assert set(schema["properties"]) >= {"model", "data", "task", "method", "quantization", "train", "eval", "export"}


def test_shipped_recipes_validate(tmp_path):
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)
        assert path.read_text().startswith(f"# peftkit run recipes/{path.name}"), f"{path.name}: first line"


def test_cli_exit_code_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_(method__rr=4, train__epochs="x")))
    result = peftkit("validate", bad)
    assert result.returncode == 2
    assert "method.rr" in result.stderr and "train.epochs" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
