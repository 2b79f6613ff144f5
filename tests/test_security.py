"""Security defaults: safetensors and JSON only in what peftkit writes, YAML loaded safely, remote code only on
request (with a warning), and Hub tokens never written to run folders or logs."""

import pytest

from peftkit.errors import UserError
from peftkit.recipe import load_recipe
from peftkit.run import run

SECRET = "hf_peftkitTestTokenNeverWritten0123"


def test_run_writes_no_pickle_and_no_token(recipe_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)  # where huggingface_hub reads a token from
    path = recipe_file(
        model={"name": str(load_recipe(recipe_file()).model.name), "trust_remote_code": True},
        train={"max_steps": 2, "batch_size": 8, "checkpoint_every": 1},
    )
    with caplog.at_level("DEBUG", logger="peftkit"):
        out = run(load_recipe(path)).output
    assert "trust_remote_code is on" in caplog.text
    files = [p for p in out.rglob("*") if p.is_file()]
    allowed = {".safetensors", ".json", ".yaml", ".log", ".txt", ".md", ".jinja", ".png"}  # .png: memory.png
    scalars = [p for p in files if p.parent.name == "tensorboard"]  # TensorBoard's own protobuf records
    assert scalars and all(p.name.startswith("events.out.tfevents.") for p in scalars)
    other = [p for p in files if p not in scalars]
    assert {p.suffix for p in other} <= allowed, [p.name for p in other if p.suffix not in allowed]
    for file in files:
        assert SECRET.encode() not in file.read_bytes(), file
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    "text",
    [
        "model: !!python/object/apply:os.system ['echo pwned']\n",
        "!!python/name:os.system\n",
    ],
)
def test_yaml_tags_that_run_code_are_refused(tmp_path, text):
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(UserError):
        load_recipe(path)
