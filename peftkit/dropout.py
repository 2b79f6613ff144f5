"""Dropout at the speed of the matmuls on CPUs: a keep-mask from random integer bits instead of torch's
`bernoulli_`, which draws one random float per element (19-35% of a LoRA training step on 2-core CPUs).

The distribution: every element is kept with probability 1 - p_eff and scaled by 1 / (1 - p_eff), zeroed
otherwise, independently; p_eff is p rounded to a multiple of 1/65536 (RESOLUTION), so

    |p_eff - p| <= 1/131072 (7.6e-6),    E[output] = input exactly (the scale is p_eff's own).

One random 16-bit word per element, kept when the word is at least -32768 + round(p * 65536). The words
(`random_words`) come from numpy's SFC64, seeded for each mask by one draw from torch's default CPU generator, so
`torch.manual_seed`, accelerate's set_seed, checkpoints (which save torch.get_rng_state()), bit-exact resume and
gradient checkpointing's recomputation (which restores that generator's state) decide every mask as they do
nn.Dropout's; the masks themselves differ from nn.Dropout's.

Why 16-bit words and not bytes (p to 1/256, |p_eff - p| <= 1/512): on an AMD EPYC with AVX512-BF16, one
thread, a 32x30x384 fp32 dropout's forward takes 0.76 ms with words, 0.65 ms with bytes (twice fewer random
bits), 2.28 ms with F.dropout; bytes would save ~1% of a LoRA step and put p = 0.1 at 0.1016 (benchmarks/
dropout.py, benchmarks/RESULTS.md).

Used for every dropout of a CPU training run (`train.fast_dropout`, run.py calls `install`): the model's
nn.Dropout modules (transformers' hidden and attention dropouts) become FastDropout, peft's `lora_dropout`s
become SharedInputDropout (adapted layers reading one tensor share its mask, and skip peft's input cast under
autocast; LoRA's own layer forward, methods/lora_branch.py, takes the mask itself through `masked`), and the
model's attention function is wrapped so that the dropout on the attention probabilities is
this one too (`_Redirect`). Left alone on CUDA, where torch's dropout is fused and fast.
"""

import logging
import sys

import numpy
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

log = logging.getLogger("peftkit")

BITS = 16
RESOLUTION = 1 / (1 << BITS)  # p_eff is a multiple of this
_LOWEST = -(1 << (BITS - 1))  # the smallest int16
PROFILE_NAME = "peftkit::random_words"  # random_words' span in torch.profiler's tables


def effective_p(p: float) -> float:
    """The drop probability actually used for `p`: the nearest multiple of RESOLUTION."""
    return round(p * (1 << BITS)) * RESOLUTION


def random_words(n: int) -> torch.Tensor:
    """`n` uniformly random int16 words, as a deterministic function of torch's default CPU generator: one 63-bit
    draw from it seeds numpy's SFC64, whose raw output is the words. torch's own generator (mt19937, through
    random_) gives random bits at ~6 ns per 64-bit word on these CPUs, SFC64 at ~2 ns (benchmarks/dropout.py, its
    "random draws alone"); torch has no faster CPU generator. Seeding from torch keeps `torch.manual_seed`, saved
    generator states (checkpoints, exact resume) and gradient checkpointing's replay (which restores that
    generator) in charge of every mask."""
    # Named for torch.profiler (benchmarks/levers.py --profile): numpy's work is no torch operator of its own.
    with torch.profiler.record_function(PROFILE_NAME):
        seed = torch.empty((), dtype=torch.int64).random_()
        if isinstance(seed, FakeTensor):  # `peftkit estimate`'s step on fake tensors: the mask's shape, no values
            return torch_words(n)
        raw = numpy.random.SFC64(int(seed)).random_raw((n + 3) // 4)  # uint64s, 4 words each
        return torch.from_numpy(raw.view(numpy.int16))[:n]


def torch_words(n: int) -> torch.Tensor:
    """`n` random int16 words from torch's own generator (mt19937): 64-bit draws over their full range (random_()
    without bounds leaves an int64's top bit at 0). What `random_words` gives on fake tensors, which SFC64 cannot
    be seeded from, and what the fast dropout drew before it (benchmarks/dropout.py)."""
    return torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)[:n]


def keep_mask(shape, p: float) -> torch.Tensor:
    """A bool CPU tensor of `shape`, each element True with probability 1 - effective_p(p), from `random_words`."""
    n = 1
    for size in shape:
        n *= size
    dropped = round(p * (1 << BITS))  # how many of the 65536 word values drop the element
    return random_words(n).view(shape) >= _LOWEST + dropped


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the mask from `keep_mask`; autograd multiplies the gradient by the same
    mask and scale (a plain mask-multiply: the saved tensor is the bool mask, as for torch's own dropout).
    Off the CPU it is F.dropout itself."""
    if p < 0 or p > 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    p = effective_p(p)
    if p == 0:
        return x
    if p == 1:
        return x * 0
    # The mask as uint8 (the same bytes): torch's CPU kernels convert bool to a float type element by element and
    # uint8 vectorised, which made a dropout's forward + backward ~2x slower (benchmarks/dropout.py). x * keep is
    # exact (x or 0) in x's dtype; the scale is then applied in one rounding (bf16's opmath is fp32).
    keep = keep_mask(x.shape, p).view(torch.uint8)
    return x.mul(keep).mul_(1 / (1 - p))


class FastDropout(torch.nn.Dropout):
    """nn.Dropout with `fast_dropout`'s mask: the identity in eval mode, the same `p` and `inplace` attributes
    (read by attention modules that pass `self.dropout.p` to their attention function). `inplace` is accepted
    and ignored: the output is always a new tensor (same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


class _LastDrop:
    """The adapter dropouts' memory of their last call, shared by the adapter layers of one model."""

    def __init__(self) -> None:
        self.input = self.output = None
        self.key: tuple = ()


class SharedInputDropout(FastDropout):
    """FastDropout for adapter branches: adapted layers that read the same input tensor (query, key and value read
    the block's hidden states; a decoder's gate and up projections the normed stream) drop the same elements of
    it, drawn once, as one dropout in front of a fused qkv projection (GPT-2's c_attn) does. Each branch still
    sees a Bernoulli(1 - p) keep-mask scaled by 1 / (1 - p); the branches' masks are now one mask. Saves the
    repeated draws and mask multiplies of LoRA on every layer (benchmarks/RESULTS.md). "The same input" is the same
    tensor object, unmodified (its version), in the same grad mode and the same forward or recomputation, with
    the same p."""

    def __init__(self, p: float, inplace: bool, last: _LastDrop) -> None:
        super().__init__(p, inplace)
        self._last = last  # a plain attribute (not a module): not in state dicts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu":
            return super().forward(x)
        return self._once_per_input(x, "dropped", lambda: super(SharedInputDropout, self).forward(x))

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """(x * keep, keep, p_eff) with the same sharing as `forward`: the kept values not yet scaled by
        1 / (1 - p_eff), which the caller folds into its own multiply (methods/lora_branch.py: into LoRA's
        up-projection GEMM), and keep the uint8 0/1 mask, for the caller's backward. Computed without autograd:
        the caller's autograd.Function owns the gradient. (x, None, 0.0) in eval mode or where p_eff is 0. CPU
        tensors only (the fast dropout's domain)."""
        p = effective_p(self.p)
        if not self.training or p == 0:
            return x, None, 0.0

        def draw():
            keep = keep_mask(x.shape, p).view(torch.uint8)
            with torch.no_grad():
                return x * keep, keep, p

        return self._once_per_input(x, "masked", draw)

    def _once_per_input(self, x: torch.Tensor, kind: str, make):
        """`make()` for the first adapter layer that reads `x`; the same result for the others (the model's shared
        memory, `_last`), for as long as x is that tensor, unmodified, in the same grad mode, pass and `kind`."""
        # The backward's task id (-1 outside a backward): gradient checkpointing recomputes a block inside the
        # backward from its saved input, the very tensor the forward's last adapter dropout of that block saw; it
        # must draw again (after restoring the generator) as the forward did, not take the forward's cached mask.
        graph_task = torch._C._current_graph_task_id()
        last, key = self._last, (x._version, self.p, torch.is_grad_enabled(), graph_task, kind)
        if last.input is x and last.key == key:
            return last.output
        # Holding x keeps its id from being reused by another tensor while cached; autograd holds both anyway.
        last.input, last.key, last.output = x, key, make()
        return last.output


def _cast_unless_autocast(layer: torch.nn.Module) -> None:
    """peft casts an adapter layer's input to the adapter's dtype before its dropout (bf16 activations to the fp32
    adapter: a copy per adapted layer), and autocast then casts it back to bf16 for the matmul. Under autocast
    the first cast is a round trip for nothing, and it hands each layer its own copy, so layers reading one
    tensor could not share its dropout: skip it there. Outside autocast peft's cast stays (the dtypes must
    match). The value reaching the matmul is round_bf16(x * scale) either way."""
    original = layer._cast_input_dtype

    def cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if x is not None and torch.is_autocast_enabled(x.device.type):
            return x
        return original(x, dtype)

    layer._cast_input_dtype = cast


def share_adapter_dropouts(model: torch.nn.Module) -> int:
    """peft adapter layers' dropouts (`lora_dropout`) become SharedInputDropout, one memory per model, and their
    input casts are skipped under autocast (_cast_unless_autocast). Returns how many layers changed."""
    last, shared = _LastDrop(), 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not hasattr(module, "_cast_input_dtype"):
            continue
        if any(isinstance(child, SharedInputDropout) for child in dropouts.values()):  # installed already
            continue
        for name, child in list(dropouts.items()):
            if type(child) in (torch.nn.Dropout, FastDropout):
                dropouts[name] = SharedInputDropout(child.p, child.inplace, last).train(child.training)
        _cast_unless_autocast(module)
        shared += 1
    return shared


def replace_dropouts(model: torch.nn.Module) -> int:
    """Every plain nn.Dropout module of `model` becomes a FastDropout with the same p (in place; state dicts are
    unchanged: dropout holds no tensors). Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is torch.nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                parent._modules[name] = fast
                replaced += 1
    return replaced


# Attention. transformers' attention functions apply dropout to the attention probabilities themselves: eager
# through F.dropout (each model file has its own eager_attention_forward), sdpa through
# F.scaled_dot_product_attention(dropout_p=...), which on a CPU then takes torch's math path with bernoulli_.
# peftkit registers a wrapper of the model's attention function (AttentionInterface) that, only in a CPU
# training call with dropout > 0, runs the original under _Redirect: its F.dropout becomes fast_dropout, its
# SDPA call with dropout_p > 0 the same maths (_math_attention) with fast_dropout. Any other call (evaluation,
# no attention dropout, CUDA) goes to the original untouched.

PREFIX = "peftkit_fast_dropout_"


class _Redirect(TorchFunctionMode):
    """F.dropout -> fast_dropout; F.scaled_dot_product_attention with dropout_p > 0 -> _math_attention. Every
    other torch call passes through (torch disables the mode inside this method, so nothing here recurses)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return _functional_dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return _sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _functional_dropout(input, p=0.5, training=True, inplace=False):  # F.dropout's signature
    return fast_dropout(input, p, training)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p == 0:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return _math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """softmax(q k^T * scale + mask) with fast_dropout, times v: what SDPA computes on a CPU when it has dropout
    (its math path), with eager attention's precision (matmuls in the inputs' dtype, softmax in fp32). Masked
    scores are set to the dtype's lowest value, as eager masks do, not -inf: a query row with every key masked
    (padding) then averages the values instead of giving NaN (SDPA gives 0 there); its output is padding's."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped-query attention: repeat each key/value head
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * (query.shape[-1] ** -0.5 if scale is None else scale)
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, lowest)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, lowest) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(fast_dropout(probs, dropout_p), value)


def _eager_of(module):
    """The eager attention function of the model file that defines `module`'s class (transformers keeps one
    per model file, and calls it when no other implementation is registered)."""
    found = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if found is None:
        raise RuntimeError(
            f"fast dropout: {type(module).__name__}'s model file has no eager_attention_forward to wrap; "
            "set train.fast_dropout: false"
        )
    return found


def _always(function):
    """A registered attention function, whichever module calls it."""
    return lambda module: function


def _wrapped(original):
    """An attention function that calls `original(module)`'s with fast dropout in CPU training calls."""

    def attention(module, query, *args, **kwargs):
        function = original(module)
        if module.training and kwargs.get("dropout", 0.0) > 0 and query.device.type == "cpu":
            with _Redirect():
                return function(module, query, *args, **kwargs)
        return function(module, query, *args, **kwargs)

    return attention


def wrap_attention(model) -> str:
    """Switch the transformers model inside `model` to a wrapper of its attention implementation (registered as
    PREFIX + its name). Returns what was done, for the log."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    current = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    if not isinstance(current, str):
        return "attention left alone (no transformers model with one attention implementation)"
    if current.startswith(PREFIX):
        return f"attention already {current}"
    if current == "eager":
        if getattr(hf.config, "reorder_and_upcast_attn", False):  # GPT-2's own eager path: its attn_dropout module
            return "attention: GPT-2's reorder_and_upcast_attn path, which applies the (replaced) dropout module"
        original = _eager_of
    elif current in ALL_ATTENTION_FUNCTIONS:
        original = _always(ALL_ATTENTION_FUNCTIONS[current])
    else:
        return f"attention left alone ({current}: not a registered attention function)"
    name = PREFIX + current
    AttentionInterface.register(name, _wrapped(original))
    if current in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:  # the same masks as the wrapped implementation's
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    hf.set_attn_implementation(name)
    if hf.config._attn_implementation != name:  # a model that cannot switch (transformers warned)
        return f"attention left alone ({type(hf).__name__} cannot change its attention implementation)"
    return f"attention {current} -> {name}"


def install(model) -> str:
    """Every dropout of `model` fast: its nn.Dropout modules, and its attention's dropout. For CPU training
    (run.py calls it through loading.fast_dropout). Returns what was done, for the log."""
    shared = share_adapter_dropouts(model)  # first: replace_dropouts takes only plain nn.Dropout modules
    replaced = replace_dropouts(model)
    return (
        f"{replaced} dropout module(s) replaced, {shared} adapter layer(s) sharing one mask per input; "
        f"{wrap_attention(model)}"
    )
