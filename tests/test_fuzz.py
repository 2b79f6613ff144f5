"""Recipe fuzzing: hundreds of broken recipes, each must fail as a user error that names the field — never a
traceback. Generated from valid recipes by walking every key: unknown keys at every level, wrong types for
every value, out-of-range numbers, missing required parts, broken YAML, empty files."""

import copy

import pytest
import yaml

from peftkit.errors import UserError
from peftkit.recipe import load_recipe, validate

from .conftest import peftkit

BASES = [
    {
        "model": {"name": "m"},
        "data": {"source": "d.csv"},
        "task": {"type": "classification"},
        "method": {"name": "lora"},
        "quantization": {"bits": 4},
    },
    {
        "model": {"name": "m"},
        "data": {"source": "d.conll"},
        "task": {"type": "token_classification"},
        "method": {"name": "prefix_tuning"},
    },
    {
        "model": {"name": "m"},
        "data": {"source": "d.json"},
        "task": {"type": "question_answering"},
        "method": {"name": "bottleneck"},
    },
    {"model": {"name": "m"}, "data": {"source": "d.txt"}, "task": {"type": "causal_lm"}, "method": {"name": "adalora"}},
    {
        "model": {"name": "m"},
        "data": {"source": "d.csv", "label_separator": "|"},
        "task": {"type": "classification", "problem_type": "multi_label", "threshold": 0.4},
        "method": {"name": "ia3"},
    },
    {
        "model": {"name": "m"},
        "data": {"source": "d.csv"},
        "task": {"type": "classification", "problem_type": "regression"},
        "method": {"name": "lora"},
    },
]
POSITIVE = {
    "r",
    "alpha",
    "epochs",
    "batch_size",
    "lr",
    "max_length",
    "grad_accum",
    "reduction_factor",
    "num_virtual_tokens",
    "init_r",
    "target_r",
    "doc_stride",
    "n_best",
    "max_new_tokens",
    "merge_tolerance",
    "threshold",
}
BAD_YAML = [
    "model: [unclosed",
    "a: b: c",
    "model:\n\t- tab",
    "{",
    "- just\n- a list",
    "42",
    "'unterminated",
    "model: {name: x",
]


def leaves(tree, path=()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, path + (key,))
        else:
            yield path + (key,), value


def put(tree, path, value):
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


def wrong_values(value):
    if isinstance(value, bool):
        return ["perhaps", [True]]
    if isinstance(value, (int, float)):
        return ["many", [1, 2]]
    if isinstance(value, str):
        return [{"nested": 1}, ["a", "b"]]
    if isinstance(value, list):
        return [42, {"k": "v"}]
    return [{"k": 1}, [[1]]]  # None (optional) and empty-dict leaves


def cases():
    """(case id, recipe text, words the error must contain)."""
    for b, base in enumerate(BASES):
        resolved = validate({"name": "t", **base}).model_dump(mode="json")
        resolved.pop("name")
        if "quantization" in base:
            resolved["quantization"] = resolved["quantization"] or {"bits": 4}
        for path, value in leaves(resolved):
            dotted = ".".join(path)
            if path[-1] in ("type", "name") and len(path) == 2 and path[0] in ("task", "method"):
                yield f"{b}-badtag-{dotted}", put(resolved, path, "no-such-thing"), [dotted]
                continue
            for i, wrong in enumerate(wrong_values(value)):
                yield f"{b}-type{i}-{dotted}", put(resolved, path, wrong), [dotted]
            if path[-1] in POSITIVE:
                yield f"{b}-range-{dotted}", put(resolved, path, -3), [dotted]
        for section in [()] + [(k,) for k, v in resolved.items() if isinstance(v, dict)]:
            where = ".".join(section + ("bogus_key",))
            yield f"{b}-unknown-{where}", put(resolved, section + ("bogus_key",), 1), [where]
        for required in ["model", "data", "task", "method"]:
            broken = {k: v for k, v in resolved.items() if k != required}
            yield f"{b}-missing-{required}", broken, [required]
        for path in [("model", "name"), ("data", "source")]:
            broken = copy.deepcopy(resolved)
            del broken[path[0]][path[1]]
            yield f"{b}-missing-{'.'.join(path)}", broken, [".".join(path)]


CASES = list(cases())


def test_there_are_at_least_200_cases():
    assert len(CASES) >= 200, len(CASES)


@pytest.mark.parametrize("case_id,recipe,words", CASES, ids=[c[0] for c in CASES])
def test_broken_recipe_is_a_user_error_naming_the_field(tmp_path, case_id, recipe, words):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError) as error:
        load_recipe(path)
    for word in words:
        assert word in str(error.value), str(error.value)


@pytest.mark.parametrize("text", BAD_YAML + ["", "   \n", "# only a comment\n"])
def test_broken_yaml_and_empty_files_are_user_errors(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="r.yaml"):
        load_recipe(path)


def test_every_broken_recipe_exits_2_through_the_cli(tmp_path):
    """The real command line over all of them at once: exit code 2, one error per file, no traceback."""
    files = []
    for i, (_, recipe, _) in enumerate(CASES):
        files.append(tmp_path / f"{i}.yaml")
        files[-1].write_text(yaml.safe_dump(recipe))
    for i, text in enumerate(BAD_YAML + [""]):
        files.append(tmp_path / f"yaml{i}.yaml")
        files[-1].write_text(text)
    result = peftkit("validate", *files)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout.count("ok ") == 0
    assert result.stderr.count("error: ") == len(files)
