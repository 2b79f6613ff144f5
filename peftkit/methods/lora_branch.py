"""LoRA's layer forward for training, cheaper than peft's: `install` gives each plain peft LoRA layer
(peft.tuners.lora.layer.Linear) a forward computing

    y = W0 x + b0 + s B (A d(x))        d: the adapter's dropout, s = alpha / r (or rsLoRA's)

with fewer passes over activations and fewer autograd nodes. Where the base is a plain nn.Linear and the
adapter's dropout is peftkit's shared fast dropout or none (dropout.SharedInputDropout, nn.Identity), the whole
layer is one autograd node (`_LoraLinear`): d(x) = x * keep / (1 - p), and the 1 / (1 - p) rides on the
up-projection's GEMM (alpha = s / (1 - p)) instead of a pass over x; the backward sends the branch's gradient
into the base's input gradient with one GEMM accumulation (no dropout) or one fused multiply-add with the keep
mask, where autograd would run the mask multiply, the scale and a sum as separate passes; and it computes the
thin products of B's side in the operand order this CPU's BLAS is fast at (benchmarks/levers.py --products:
3-4x). Elsewhere (torch's own dropout, a quantised or Conv1D base) the branch is still one `addmm` on top of the
base layer's output (`_fused`). Layers with a peft variant (DoRA, ...), a LoRA bias, several active adapters, or
called with peft's extra arguments keep peft's forward. What each saves: benchmarks/RESULTS.md, "LoRA on every
layer against query/value".
"""

import types

import torch
from peft.tuners.lora.layer import Linear

from peftkit.dropout import SharedInputDropout


def install(model: torch.nn.Module) -> int:
    """The forward above on every plain peft LoRA layer of `model` (not peft's subclasses: bitsandbytes layers
    and others have their own forwards). Returns how many layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed


def _forward(self: Linear, x, *args, **kwargs):
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    scaling = self.scaling.get(name)
    if (
        args
        or kwargs
        or name not in self.lora_A
        or name in self.lora_variant
        or self.lora_B[name].bias is not None
        or self.disable_adapters
        or self.merged
        or not isinstance(scaling, (int, float))
    ):
        return type(self).forward(self, x, *args, **kwargs)
    a, b, dropout = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_dropout[name]
    dtype = _compute_dtype(self, x, a, b)
    shared = isinstance(dropout, SharedInputDropout) and x.device.type == "cpu"
    if dtype is not None and (shared or isinstance(dropout, torch.nn.Identity)):
        h, keep, p = dropout.masked(x) if shared else (x, None, 0.0)
        base = self.base_layer
        alpha = scaling / (1 - p) if p < 1 else 0.0  # p rounded to 1 (dropout.effective_p): nothing kept
        return _LoraLinear.apply(x, base.weight, base.bias, a, b, h, keep, alpha, dtype)
    return _fused(self, x, name, scaling)


def _compute_dtype(self: Linear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.dtype | None:
    """The dtype `_LoraLinear` computes in (autocast's, or the one dtype of input and weights), or None where it
    does not apply: a base that is not a plain, frozen nn.Linear with no hooks, or mixed dtypes without autocast."""
    base = self.base_layer
    if (
        type(base) is not torch.nn.Linear
        or self.fan_in_fan_out
        or base.weight.requires_grad
        or base._forward_hooks
        or base._forward_pre_hooks
        or not x.is_floating_point()
    ):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype == base.weight.dtype == a.dtype == b.dtype else None


def _fused(self: Linear, x, name: str, scaling: float):
    """W0 x + s B (A d(x)) as one addmm on top of the base layer's output: the scale and the sum ride on the
    up-projection's GEMM instead of two passes over the output, forward and backward."""
    result = self.base_layer(x)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    h = self.lora_dropout[name](self._cast_input_dtype(x, a.dtype))
    if result.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):  # peft's mixed-dtype sum
        return (result + self.lora_B[name](self.lora_A[name](h)) * scaling).to(result.dtype)
    down = h.reshape(-1, h.shape[-1]) @ a.t()
    return torch.addmm(result.reshape(-1, result.shape[-1]), down, b.t(), alpha=scaling).view(result.shape)


class _LoraLinear(torch.autograd.Function):
    """y = x W0^T + b0 + alpha (h A^T) B^T, h = x * keep (keep: a uint8 0/1 mask, or None: h is x), in `dtype`
    with autocast off inside (the casts are explicit: autocast would make the same ones). Gradients for x, A and
    B; W0 and b0 are frozen (_compute_dtype checks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, h, keep, alpha, dtype):
        with torch.autocast(x.device.type, enabled=False):
            w, a_c, b_c = weight.to(dtype), a.to(dtype), b.to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            h2 = x2 if h is x else h.reshape(-1, h.shape[-1]).to(dtype)  # no dropout: one cast of x, not two
            out = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            down = h2 @ a_c.t()
            out.addmm_(down, b_c.t(), alpha=alpha)
        ctx.save_for_backward(w, a_c, b_c, h2, down, keep)
        ctx.alpha, ctx.x_meta, ctx.ab_dtypes = alpha, (x.shape, x.dtype), (a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        w, a, b, h2, down, keep = ctx.saved_tensors
        (x_shape, x_dtype), (a_dtype, b_dtype) = ctx.x_meta, ctx.ab_dtypes
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
            # The thin products as (r x T) results: g @ B and g^T @ down in this order run 3-4x slower in MKL on
            # these shapes than their transposes (benchmarks/levers.py --products).
            g_down_t = (b.t() @ g.t()).mul_(ctx.alpha)  # (r, T): the gradient at A's output, transposed
            if ctx.needs_input_grad[4]:
                grad_b = (down.t() @ g).t().mul(ctx.alpha).to(b_dtype)
            if ctx.needs_input_grad[3]:
                grad_a = (g_down_t @ h2).to(a_dtype)
            if ctx.needs_input_grad[0]:
                grad_x = g @ w
                if keep is None and x_dtype == grad_x.dtype:
                    grad_x.addmm_(g_down_t.t(), a)
                else:  # the sum in x's dtype: under autocast fp32 activations get fp32 gradients, as autograd's sum
                    grad_x, branch = grad_x.to(x_dtype), (g_down_t.t() @ a).to(x_dtype)
                    grad_x = grad_x.add_(branch) if keep is None else grad_x.addcmul_(branch, keep.view(branch.shape))
                grad_x = grad_x.view(x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None
