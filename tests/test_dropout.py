"""peftkit's fast CPU dropout (peftkit/dropout.py): nn.Dropout's distribution and semantics from random integer
bits of torch's seeded generator, and its installation into a model (dropout modules and attention)."""

import pytest
import torch
import torch.nn.functional as F

from peftkit import dropout, loading
from peftkit.dropout import FastDropout, SharedInputDropout, effective_p, fast_dropout

from .conftest import make_bert

N = 1 << 22  # draws per statistical check: the standard error of the keep rate at p = 0.1 is 1.5e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale_over_many_draws(p, dtype):
    torch.manual_seed(0)
    out = fast_dropout(torch.ones(N, dtype=dtype), p)
    assert out.dtype == dtype and out.shape == (N,)
    scale = torch.tensor(1 / (1 - effective_p(p)), dtype=dtype)  # the one non-zero value, rounded to the dtype
    kept = out != 0
    assert torch.equal(out[kept], scale.expand(int(kept.sum())))
    # 5 standard errors: p rounded to 1/256 (0.1 -> 0.1016) or a keep rate of p instead of 1 - p fails
    rate, error = kept.double().mean().item(), (p * (1 - p) / N) ** 0.5
    assert abs(rate - (1 - p)) < 5 * error, rate
    if dtype == torch.float32:  # the expectation is the input: mean within 5 standard errors of 1
        assert abs(out.double().mean().item() - 1) < 5 * (p / (1 - p) / N) ** 0.5


def test_the_probability_is_rounded_to_a_multiple_of_1_65536():
    for p in torch.linspace(0, 1, 10001).tolist() + [0.1, 1 / 3, 1e-6, 1 - 1e-6]:
        q = effective_p(p)
        assert abs(q - p) <= 2**-17 and (q * 65536).is_integer() and 0 <= q <= 1


def test_same_seed_same_mask_and_the_generator_state_resumes_it():
    x = torch.randn(7, 13, 5)
    torch.manual_seed(3)
    first, second = fast_dropout(x, 0.3), fast_dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x, 0.3), first)
    state = torch.get_rng_state()  # what a checkpoint saves
    assert torch.equal(fast_dropout(x, 0.3), second)
    torch.set_rng_state(state)
    assert torch.equal(fast_dropout(x, 0.3), second)
    assert not torch.equal(first, second)  # each call draws anew
    torch.manual_seed(4)
    assert not torch.equal(fast_dropout(x, 0.3), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_backward_uses_the_forwards_mask(dtype):
    torch.manual_seed(0)
    x = (torch.rand(64, 33, dtype=dtype) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    out = fast_dropout(x, 0.25)
    grad = torch.rand_like(out) + 0.5
    out.backward(grad)
    kept, scale = out != 0, 1 / (1 - effective_p(0.25))
    assert 0 < kept.float().mean() < 1
    assert torch.equal(x.grad, torch.where(kept, grad.float() * scale, 0).to(dtype))
    assert torch.equal(out, torch.where(kept, x.detach().float() * scale, 0).to(dtype))


def test_eval_is_the_identity_and_p_0_and_1_are_nn_dropouts():
    x = torch.randn(4, 6, requires_grad=True)
    module = FastDropout(0.4)
    assert module.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    zeros = FastDropout(1.0).train()(x)
    assert torch.equal(zeros, torch.zeros_like(x))
    zeros.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.4  # attention modules read `.p`
    with pytest.raises(ValueError):
        fast_dropout(x, 1.5)


def test_any_shape_and_non_contiguous_inputs():
    x = torch.randn(6, 10)
    torch.manual_seed(1)
    out = fast_dropout(x.t(), 0.5)  # non-contiguous: the same mask as its contiguous copy
    torch.manual_seed(1)
    assert torch.equal(out, fast_dropout(x.t().contiguous(), 0.5))
    for shape in [(), (0,), (3,), (5, 7), (2, 3, 5, 7)]:  # element counts that are no multiple of 4 too
        assert fast_dropout(torch.ones(shape), 0.5).shape == shape


def test_gradient_checkpointing_recomputes_the_same_masks():
    from torch.utils.checkpoint import checkpoint

    def block(x):
        return fast_dropout(x * 2, 0.5).sin()

    x = torch.randn(50, 20, requires_grad=True)
    torch.manual_seed(5)
    block(x).sum().backward()
    plain, x.grad = x.grad, None
    torch.manual_seed(5)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, plain)


@pytest.mark.parametrize("case", ["bool", "float", "causal", "gqa", "none"])
def test_the_attention_maths_is_sdpas(case):
    """_math_attention replaces SDPA's calls with dropout; with a dropout too small to drop anything it computes
    what SDPA does."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask, causal, gqa = None, False, False
    if case == "bool":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[0, :, :, 4:] = False
    elif case == "float":
        mask = torch.randn(2, 1, 6, 6)
    elif case == "causal":
        causal = True
    elif case == "gqa":
        k, v, gqa = k[:, :2], v[:, :2], True
    expected = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, enable_gqa=gqa)
    got = dropout._math_attention(q, k, v, mask, 1e-7, causal, None, gqa)  # p rounds to 0
    torch.testing.assert_close(got, expected)


def lora_bert(folder, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation=attn)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"])
    return get_peft_model(model, config)


RANDOM_FLOATS = {"aten::bernoulli_", "aten::native_dropout", "aten::_fused_dropout", "aten::uniform_"}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_tiny_bert_after_the_swap(tmp_path, attn):
    model = lora_bert(make_bert(tmp_path / "bert"), attn)
    ids = torch.randint(5, 30, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    before = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert any(type(m) is torch.nn.Dropout for m in model.modules())
    report = dropout.install(model)
    assert "dropout module(s) replaced" in report and f"-> {dropout.PREFIX}{attn}" in report
    model.train()
    assert not [name for name, m in model.named_modules() if type(m) is torch.nn.Dropout]
    lora = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_dropout["default"]
    assert type(lora) is SharedInputDropout and lora.p == 0.1
    with torch.profiler.profile() as prof:  # a training step draws no random floats: hidden, attention, LoRA
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert not RANDOM_FLOATS & {e.key for e in prof.key_averages()}
    torch.manual_seed(9)
    first = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(9)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, first)
    assert torch.equal(model.eval()(input_ids=ids, attention_mask=mask).logits, before)  # eval: unchanged
    assert dropout.install(model).startswith("0 dropout module(s) replaced, 0 adapter layer(s)")


def test_the_recipe_switch_and_the_device_decide(tmp_path):
    from types import SimpleNamespace

    folder = make_bert(tmp_path / "bert")
    for fast, device, expected in [(False, "cpu", True), (True, "cuda", True), (True, "cpu", False)]:
        model = lora_bert(folder, "eager")
        recipe = SimpleNamespace(train=SimpleNamespace(fast_dropout=fast))
        loading.use_fast_dropout(model, recipe, torch.device(device))
        assert any(type(m) is torch.nn.Dropout for m in model.modules()) is expected
        assert model.config._attn_implementation == ("eager" if expected else dropout.PREFIX + "eager")


def test_adapted_layers_reading_one_input_share_its_mask_and_skip_the_cast_under_autocast(tmp_path):
    model = lora_bert(make_bert(tmp_path / "bert"), "eager")
    dropout.install(model)
    model.train()
    attention = model.base_model.model.bert.encoder.layer[0].attention.self
    seen = {}  # each adapter dropout's input and output, per layer
    for name in ("query", "value"):
        module = getattr(attention, name).lora_dropout["default"]
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    ids = torch.randint(5, 30, (4, 12))
    model(input_ids=ids).logits.sum().backward()
    (q_in, q_out), (v_in, v_out) = seen["query"], seen["value"]
    assert q_in is v_in and q_out is v_out  # one draw for the shared hidden states
    assert 0 < (q_out == 0).float().mean() < 0.3  # and it is a dropout (p 0.1)
    layer1 = model.base_model.model.bert.encoder.layer[1].attention.self.query.lora_dropout["default"]
    assert layer1._last is attention.query.lora_dropout["default"]._last  # one memory per model
    # Another input draws its own mask; the same input after an in-place change too.
    shared = attention.query.lora_dropout["default"]
    x = torch.ones(64, 64)
    first = shared(x)
    assert shared(x) is first and not torch.equal(shared(torch.ones(64, 64)), first)
    x.add_(0)
    assert shared(x) is not first
    # A bf16 base (as peftkit holds it in bf16 runs) under autocast: the fp32 adapter's input stays the bf16
    # activation (no copy per layer)...
    model.base_model.model.bert.to(torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.lora_A.float(), module.lora_B.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.sum().backward()
    assert seen["query"][0].dtype == torch.bfloat16 and seen["query"][0] is seen["value"][0]
    # ... and outside autocast peft's cast still makes the dtypes meet
    out = attention.query(torch.randn(2, 3, attention.query.in_features, dtype=torch.bfloat16))
    assert seen["query"][0].dtype == torch.float32 and out.dtype == torch.bfloat16


def test_shared_masks_are_recomputed_alike_under_gradient_checkpointing(tmp_path):
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = lora_bert(make_bert(tmp_path / f"bert{checkpointing}"), "eager")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        dropout.install(model)
        model.train()
        torch.manual_seed(3)
        model(input_ids=torch.randint(5, 30, (4, 12))).logits.sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(False), grads(True)))
