"""LoRA on a tiny random BERT classifier: the maths and the save format, checked exactly."""

import pytest
import torch

from peftkit import dropout, export
from peftkit.errors import UserError
from peftkit.loading import load_base, method_context
from peftkit.methods import METHODS
from peftkit.recipe import validate
from peftkit.tasks import TASKS

LABELS = ["neg", "pos"]
CPU = torch.device("cpu")


def recipe_for(model_dir, **method):
    return validate(
        {
            "name": "t",
            "model": {"name": str(model_dir)},
            "data": {"source": "unused.csv"},
            "task": {"type": "classification"},
            "method": {"name": "lora", "r": 4, "alpha": 8, **method},
        }
    )


def build(model_dir, **method):
    """(recipe, tokenizer, base copy, adapted model) with the base's own copy kept for comparison."""
    recipe = recipe_for(model_dir, **method)
    task = TASKS["classification"]
    torch.manual_seed(0)
    tokenizer, model = load_base(recipe, task, LABELS, CPU)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = METHODS["lora"].apply(model, recipe.method, method_context(recipe, task, model))
    return recipe, tokenizer, base_state, adapted


def batch(tokenizer):
    texts = ["the movie was good", "a dull and boring plot", "lovely film but weak story"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0, 1]))


def test_output_at_init_equals_base(tiny_bert):
    _, tokenizer, base_state, model = build(tiny_bert, dropout=0.0)
    inputs = batch(tokenizer)
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    assert torch.equal(adapted, base)


def test_trainable_parameter_count_is_exact(tiny_bert):
    _, _, _, model = build(tiny_bert)
    hidden, inner, layers, r = 32, 64, 2, 4
    # every linear layer (LoRA's default), each A (r, in) + B (out, r): query, key, value and the attention
    # output (hidden -> hidden), the feed-forward's two (hidden -> inner -> hidden), and the pooler's dense
    per_layer = 4 * r * (hidden + hidden) + 2 * r * (hidden + inner)
    lora = layers * per_layer + r * (hidden + hidden)
    head = hidden * len(LABELS) + len(LABELS)  # classifier weight + bias
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + head
    assert all("lora_" in n or "classifier" in n for n, p in model.named_parameters() if p.requires_grad)


def test_a_step_changes_only_adapter_and_head(tiny_bert):
    _, tokenizer, base_state, model = build(tiny_bert)
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch(tokenizer)).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(("lora_" in n or "modules_to_save" in n) for n in changed)
    assert any("lora_B" in n for n in changed)
    for name, param in model.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if key in base_state and "lora_" not in name and "modules_to_save" not in name:
            assert torch.equal(param, base_state[key]), name


def train_a_little(model, tokenizer, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        model(**batch(tokenizer)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_merged_equals_unmerged(tiny_bert):
    _, tokenizer, _, model = build(tiny_bert)
    train_a_little(model, tokenizer)
    inputs = batch(tokenizer)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not torch.allclose(unmerged, unmerged * 0)  # the check is not vacuous


def test_adapter_round_trips_through_plain_peft_head_included(tiny_bert, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    recipe, tokenizer, _, model = build(tiny_bert)
    train_a_little(model, tokenizer)
    inputs = batch(tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
    export.save_adapter(model, tokenizer, tmp_path, recipe, LABELS)
    assert (tmp_path / "adapter_model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))

    torch.manual_seed(123)  # a different random head: it must come from the adapter, not the seed
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-6)


def test_target_that_matches_nothing_lists_candidates(tiny_bert):
    with pytest.raises(UserError) as err:
        build(tiny_bert, target_modules=["query", "vlaue"])
    message = str(err.value)
    assert "'vlaue'" in message and "did you mean 'value'" in message and "candidate layers:" in message
    assert "dense" in message and "classifier" not in message


def logits_and_grads(model, inputs, bf16: bool):
    model.zero_grad()
    torch.manual_seed(0)  # the model's own dropouts draw alike
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**inputs)
    out.loss.backward()
    return out.logits.float(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def distance(a, b) -> float:
    """The relative distance of two (logits, gradients) results, the worst over the logits and each gradient."""
    pairs = [(a[0], b[0]), *zip(a[1], b[1])]
    return max(((x - y).norm() / y.norm()).item() for x, y in pairs)


def changed_layers(model) -> list:
    """The LoRA layers methods/lora_branch.py gave its forward."""
    return [m for m in model.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize(
    "p, fast, node",
    [
        (0.0, False, "_LoraLinearBackward"),  # no adapter dropout: one node, the branch's gradient in one GEMM
        (0.1, True, "_LoraLinearBackward"),  # the fast dropout's mask, its 1 / (1 - p) on the up-projection
        (0.1, False, "AddmmBackward0"),  # torch's own dropout (train.fast_dropout: false): the addmm path
    ],
)
def test_the_lora_layer_forward_computes_what_peft_computes(tiny_bert, p, fast, node):
    """methods/lora_branch.py against peft's own forward, with the same dropout masks (the same seed, drawn in
    the same order): in fp32 the same logits and gradients, to rounding; under bf16 autocast no farther from the
    fp32 values than peft's own bf16 forward."""
    _, tokenizer, _, model = build(tiny_bert, dropout=p)
    train_a_little(model, tokenizer)  # B != 0
    if fast:
        dropout.install(model)
    changed = changed_layers(model)
    assert len(changed) == 2 * 6 + 1  # every linear layer of both blocks and the pooler
    model.train()
    x = torch.randn(2, 3, changed[0].in_features, requires_grad=True)
    grad_fn = changed[0](x).grad_fn
    if grad_fn.name() == "ViewBackward0":  # the addmm path's reshape back
        grad_fn = grad_fn.next_functions[0][0]
    assert grad_fn.name() == node  # the path this case is about is the one taken
    inputs = batch(tokenizer)
    ours = {bf16: logits_and_grads(model, inputs, bf16) for bf16 in (False, True)}
    for module in changed:
        del module.forward  # peft's own forward again
    theirs = {bf16: logits_and_grads(model, inputs, bf16) for bf16 in (False, True)}
    assert distance(ours[False], theirs[False]) < 1e-5
    assert distance(ours[True], theirs[False]) <= 1.5 * distance(theirs[True], theirs[False]) + 1e-3
    assert 1e-4 < distance(theirs[True], theirs[False]) < 0.1  # bf16 is measurably different, and still close


def test_the_one_node_layer_under_gradient_checkpointing(tiny_bert):
    """Recomputing a block in the backward draws the adapter's dropout mask again from the restored generator:
    the same gradients as without checkpointing."""

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        _, tokenizer, _, model = build(tiny_bert, dropout=0.1)
        train_a_little(model, tokenizer)  # B != 0: every adapter weight gets a gradient
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        dropout.install(model)
        model.train()
        torch.manual_seed(3)
        model(**batch(tokenizer)).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert all(g.abs().sum() > 0 for g in plain)


def test_layers_the_fused_branch_does_not_cover_keep_peft_forward(tiny_bert):
    """DoRA (a peft variant) and a disabled adapter take peft's forward: bit-identical to it."""
    _, tokenizer, _, model = build(tiny_bert, dora=True)
    train_a_little(model, tokenizer)
    inputs = batch(tokenizer)
    with torch.no_grad():
        ours = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        for module in model.modules():
            module.__dict__.pop("forward", None)
        assert torch.equal(ours, model(**inputs).logits)
        with model.disable_adapter():
            assert torch.equal(disabled, model(**inputs).logits)
