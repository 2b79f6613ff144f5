"""`peftkit push`, the local directory hub, pulling adapters back by name, and the Hugging Face path: the real
huggingface_hub client against a small Hub on 127.0.0.1 (tests/hub_server.py), reached through HF_ENDPOINT."""

import json
import os
import shutil
import socket

import pytest
import yaml

from tests.conftest import peftkit, peftkit_here, small_recipe
from tests.hub_server import FakeHub

TEXTS = ["good great film", "awful boring plot"]
TOKEN = "hf_test_token_5e3b"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, sentiment_csv):
    """One finished tiny LoRA run (with a before-training evaluation), and its recipe as a dict."""
    root = tmp_path_factory.mktemp("hub")
    recipe = small_recipe(tiny_bert, sentiment_csv, root / "runs")
    recipe["name"] = "source"
    path = root / "source.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = peftkit_here("run", path)
    assert result.returncode == 0, result.stderr
    return root / "runs" / "source", recipe


def hub_env(tmp_path, endpoint, token=TOKEN):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return {**env, "HF_TOKEN": token} if token else env


def test_model_card_metadata_and_content_parse_back(trained, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    from peftkit.run_folder import finished_run
    from peftkit.sharing.card import model_card

    def card_of(run_dir):
        _, recipe, info = finished_run(run_dir)
        metrics, text = json.loads((run_dir / "metrics.json").read_text()), (run_dir / "recipe.yaml").read_text()
        return model_card(recipe, info, metrics, text, "me/tiny")

    run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    card_of(run_dir).save(tmp_path / "local.md")
    card = ModelCard.load(tmp_path / "local.md")
    assert card.data.base_model is None  # a local path is no Hub id: left out, and said so in the text
    assert "local path" in card.text and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-classification"
    assert {"peftkit", "lora", "classification"} <= set(card.data.tags)
    assert card.data.metrics == ["accuracy", "macro_f1"]
    row = f"| test | {metrics['test']['accuracy']:.4f} | {metrics['test']['macro_f1']:.4f} |"
    assert row in card.text and "| before training, test |" not in card.text
    assert f"{metrics['trainable_params']:,} of {metrics['total_params']:,}" in card.text
    assert "```yaml\n" + (run_dir / "recipe.yaml").read_text().rstrip() + "\n```" in card.text
    assert 'PeftModel.from_pretrained(base, "me/tiny")' in card.text and "num_labels=2" in card.text

    # The same run as if its base were a Hub model: base_model is then set (and the Hub links the adapter to it)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for name in ("recipe.yaml", "adapter/peftkit.json"):
        (copy / name).write_text((copy / name).read_text().replace(str(trained[1]["model"]["name"]), "org/base-model"))
    card_of(copy).save(tmp_path / "hub.md")
    assert metadata_load(tmp_path / "hub.md")["base_model"] == "org/base-model"


def test_dry_run_lists_the_files_and_writes_nothing(trained, tmp_path):
    run_dir, _ = trained
    result = peftkit_here("push", run_dir, "--repo", "me/tiny", "--hub-dir", tmp_path / "hub", "--dry-run")
    assert result.returncode == 0, result.stderr
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "peftkit.json",
        "recipe.yaml",
        "metrics.json",
        "README.md",
        "training_curve.png",
        "tokenizer_config.json",
    ):
        assert name in result.stdout
    size = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"{size:,}" in result.stdout and "would upload" in result.stdout
    assert str(tmp_path / "hub" / "me" / "tiny" / "main") in result.stdout.replace("\n", "")
    assert not (tmp_path / "hub").exists()


def test_push_to_a_directory_hub_then_predict_by_name(trained, tmp_path, monkeypatch, tiny_bert):
    run_dir, _ = trained
    hub_dir = tmp_path / "hub"
    assert peftkit_here("push", run_dir, "--repo", "me/tiny", "--hub-dir", hub_dir).returncode == 0
    repo = hub_dir / "me" / "tiny" / "main"
    assert (repo / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert {"README.md", "recipe.yaml", "metrics.json", "peftkit.json", "training_curve.png"} <= {
        f.name for f in repo.iterdir()
    }
    assert not list(hub_dir.rglob("*.partial"))

    expected = peftkit_here("predict", run_dir, *TEXTS)
    assert expected.returncode == 0, expected.stderr
    by_name = peftkit_here("predict", "me/tiny", *TEXTS, "--hub-dir", hub_dir)
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == expected.stdout
    monkeypatch.setenv("PEFTKIT_HUB_DIR", str(hub_dir))
    assert peftkit_here("predict", "me/tiny@main", *TEXTS).stdout == expected.stdout

    # Plain peft loads the pushed folder too: the adapter lies at the repo's root
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert isinstance(PeftModel.from_pretrained(base, repo), PeftModel)

    missing = peftkit_here("predict", "me/nothing@main", *TEXTS, "--hub-dir", hub_dir)
    assert missing.returncode == 2 and "me/nothing" in missing.stderr


def test_push_and_pull_through_the_hub_api_on_loopback(trained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    run_dir, _ = trained
    with FakeHub(tokens={TOKEN}) as hub:
        # The push runs in this process (HfApi takes the endpoint from constants, the token from HF_TOKEN per
        # call); the pull below runs as a user would, in a new process that reads HF_ENDPOINT.
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        pushed = peftkit_here(
            "push", run_dir, "--repo", "me/tiny", "--revision", "v1", "--private", "--message", "first"
        )
        assert pushed.returncode == 0, pushed.stderr
        repo = hub.repos["me/tiny"]
        files = repo.files("v1")
        assert repo.private and repo.messages == ["first"] and repo.files("main") == {}  # on the branch only
        assert files["adapter_model.safetensors"] == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
        assert {"README.md", "recipe.yaml", "metrics.json", "peftkit.json", "training_curve.png"} <= files.keys()
        assert files["README.md"].startswith(b"---\n") and b"library_name: peft" in files["README.md"]
        assert hub.cards and hub.cards[0]["pipeline_tag"] == "text-classification"
        assert all(TOKEN.encode() not in data for data in files.values())
        assert TOKEN not in pushed.stdout + pushed.stderr

        pulled = peftkit("predict", "me/tiny@v1", *TEXTS, env=hub_env(tmp_path, hub.url))
        assert pulled.returncode == 0, pulled.stderr
        assert any(path.startswith("/me/tiny/resolve/") for _, path in hub.requests)
    assert pulled.stdout == peftkit_here("predict", run_dir, *TEXTS).stdout


def test_hub_errors_name_the_fix(trained, tmp_path, monkeypatch):
    # In-process: HfApi reads the endpoint from huggingface_hub.constants (HF_ENDPOINT at import) and the token
    # from HF_TOKEN at each call, so both are set here rather than in a new interpreter (~6 s each).
    from huggingface_hub import constants

    run_dir, _ = trained
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    down = peftkit_here("push", run_dir, "--repo", "me/tiny")
    assert down.returncode == 2 and "cannot reach" in down.stderr and "--hub-dir" in down.stderr
    with FakeHub(tokens={TOKEN}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        refused = peftkit_here("push", run_dir, "--repo", "me/tiny")
    assert refused.returncode == 2 and "401" in refused.stderr and "hf auth login" in refused.stderr
    assert "hf_wrong" not in refused.stderr and not hub.repos
    bad = peftkit_here("push", run_dir, "--repo", "no-namespace", "--dry-run")
    assert bad.returncode == 2 and "user/name" in bad.stderr
    unfinished = peftkit_here("push", tmp_path, "--repo", "me/tiny", "--dry-run")
    assert unfinished.returncode == 2 and "not a finished peftkit run folder" in unfinished.stderr


def test_a_recipe_can_start_from_a_pushed_adapter(trained, tmp_path, monkeypatch):
    import torch

    from peftkit.loading import load_base, load_trained, method_context
    from peftkit.methods import METHODS
    from peftkit.recipe import load_recipe
    from peftkit.sharing import hub
    from peftkit.tasks import TASKS

    run_dir, recipe = trained
    hub_dir = tmp_path / "hub"
    assert peftkit_here("push", run_dir, "--repo", "me/tiny", "--hub-dir", hub_dir).returncode == 0
    monkeypatch.setenv("PEFTKIT_HUB_DIR", str(hub_dir))
    follow = {
        **recipe,
        "name": "follow",
        "model": {**recipe["model"], "adapter": "me/tiny"},
        "train": {**recipe["train"], "max_steps": 1},
        "eval": {"before_training": True},
    }
    path = tmp_path / "follow.yaml"
    path.write_text(yaml.safe_dump(follow))

    # The freshly applied method holds exactly the source adapter's trained tensors (LoRA A/B and the head)
    parsed = load_recipe(path)
    task, method, labels = TASKS["classification"], METHODS["lora"], ["neg", "pos"]
    _, model = load_base(parsed, task, labels, torch.device("cpu"))
    model = method.apply(model, parsed.method, method_context(parsed, task, model))
    hub.load_start(model, hub.starting_adapter(parsed, labels), parsed.model.adapter)
    source_model = load_trained(run_dir, torch.device("cpu"))[3]
    theirs = dict(source_model.named_parameters())
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert mine and all(torch.equal(p, theirs[n]) for n, p in mine.items())

    # ... so the run's evaluation before its first step is the source run's final one
    result = peftkit_here("run", path, f"export.output_dir={tmp_path}/{{name}}")
    assert result.returncode == 0, result.stderr
    source = json.loads((run_dir / "metrics.json").read_text())
    before = json.loads((tmp_path / "follow" / "metrics.json").read_text())["before_training"]
    for split in ("validation", "test"):
        assert before[split]["accuracy"] == pytest.approx(source[split]["accuracy"], abs=1e-9)
        assert before[split]["macro_f1"] == pytest.approx(source[split]["macro_f1"], abs=1e-9)

    other = peftkit_here("run", path, "method.r=8", f"export.output_dir={tmp_path}/other-{{name}}")
    assert other.returncode == 2 and "method.r (4 there, 8 here)" in other.stderr
