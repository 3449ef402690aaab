"""LoRA: a trainable low-rank update beside each frozen (4-bit) linear layer of the decoder layers: the math, which
linears --lora_targets selects, and putting the adapters in.

Every adapter is an `Adapter`, and names its own trainable weights (adapter_params): FSDP's LoRA unit (fsdp_wrap),
the checkpoints, the adapter file (peft_format) and merge.py ask it, so a variant adds a weight in its own module.
LoRA on MoE experts is moe_lora.py; the PEFT adapter folder is peft_format.py.
"""
import math
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

import cli
import model_loading
import quantization
from settings import ALL_LINEAR, EXPERTS


FACTORS = ("lora_A", "lora_B")  # LoRA's two weights, by the names PEFT gives them (in modules and in its files)


class AdapterError(cli.Refusal):
    """An adapter, or a --lora_targets, that does not fit the model; the message says why and what to pass instead."""


class Adapter(nn.Module):
    """A module that adapts a frozen weight. Its trainable weights are the `.weight` of the submodules adapter_params
    names; nothing else of it trains (torchtune's AdapterModule.adapter_params is the same idea)."""

    def adapter_params(self) -> tuple[str, ...]:
        return FACTORS


class LoRAFactor(nn.Linear):
    """A or B: an fp32 master weight used in the input's dtype (bf16). Under FSDP the weight already arrives as bf16;
    unwrapped (tests, merging) the cast happens here, or in LoRALinear where it uses the weight directly, so both
    paths compute the same thing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class LoRALinear(Adapter):
    """y = base(x) + B(A(dropout(x))) * alpha / r   (Hu et al. 2021, "LoRA", https://arxiv.org/abs/2106.09685)

    r is the rank of the update B @ A (A: in -> r, B: r -> out), so it adds r * (in + out) parameters instead of
    in * out. alpha / r scales the update, so changing r does not change the effective learning rate much.
    A starts Kaiming-uniform and B at zero: the update B @ A is exactly zero, and at step 0 the model computes what
    the base model computes. A and B are fp32 master weights; under FSDP's mixed precision they compute in bf16.

    The sum is computed one of two ways (`merges` picks): the update added to the base output (`unmerged`), or added
    to the weight first, x @ (W + s B A)^T, with gradients written out (`_MergedLoRA`).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, device: torch.device | str = "cpu"):
        super().__init__()
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = factors(base.in_features, r, base.out_features, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)  # (tokens, features)
        out = self.merged(rows) if self.merges(rows) else self.unmerged(rows)
        return out.view(*x.shape[:-1], out.shape[-1])

    def merges(self, rows: torch.Tensor) -> bool:
        """Whether to add the update to the weight instead of to the output.

        Only without dropout, which applies to the update's input alone. Then always in training: one GEMM and one
        autograd node instead of four, forward and backward, which paid even at batch 1, where the weight (out x in)
        is larger than the output (BENCHMARKS.md, "What each change bought"). Without gradients, only when the
        weight is smaller than the output (more rows than input features): not in generation, where bitsandbytes
        multiplies by the 4-bit weight directly.
        """
        if self.training and not isinstance(self.dropout, nn.Identity):
            return False
        return torch.is_grad_enabled() or rows.shape[0] > self.base.in_features

    def unmerged(self, rows: torch.Tensor) -> torch.Tensor:
        out = self.base(rows)
        # The same sum as base(x) + B(A(x)) * scaling, with no extra pass over the full-width output: the scaling
        # applies to the r-wide A(x), and B's product accumulates onto the base output in place (a GEMM with beta = 1).
        # Safe because neither the 4-bit nor a plain linear layer keeps its output for backward; out-of-place addmm
        # would first copy the whole output.
        update = (self.lora_A(self.dropout(rows)) * self.scaling).to(out.dtype)
        out.addmm_(update, self.lora_B.weight.to(out.dtype).t())  # B: already bf16 under FSDP's mixed precision
        return out

    def merged(self, rows: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.weight.to(rows.dtype), self.lora_B.weight.to(rows.dtype)  # no-ops under FSDP
        bias = None if self.base.bias is None else self.base.bias.to(rows.dtype)
        return _MergedLoRA.apply(rows, self.base.weight, a, b, bias, self.base, self.scaling)


def factors(inp: int, rank: int, out: int, device: torch.device | str) -> tuple[LoRAFactor, LoRAFactor]:
    """A (inp -> rank) Kaiming-uniform, as nn.Linear and PEFT initialise it, and B (rank -> out) zero, both fp32.

    skip_init: nn.Linear's own init would draw a random A and B, both overwritten here, a cost that grows with the
    model (168M parameters for an 8B model at r=64)."""
    a = skip_init(LoRAFactor, inp, rank, bias=False, dtype=torch.float32, device=device)
    b = skip_init(LoRAFactor, rank, out, bias=False, dtype=torch.float32, device=device)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


def add_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A as a new matrix, in the dtype of its inputs: the one place the merged weight is computed
    (in training, bf16; merge.py, fp32)."""
    return torch.addmm(weight, b, a, alpha=scaling)


def dense_weight(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) matrix a base linear's `weight` stands for: dequantized from 4 bits, or the weight itself."""
    return quantization.dequantize(weight, base) if quantization.is_4bit(base) else weight


def merged_weight(base: nn.Module, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """W + scaling * B @ A as a new bf16 (out, in) matrix, W dequantized from 4 bits or taken as it is."""
    return add_update(dense_weight(base, weight), a, b, scaling)


class _MergedLoRA(torch.autograd.Function):
    """x @ (W + s B A)^T + bias in one GEMM; gradients for x, A and B as the unmerged sum has them.

    Against base(x) + s B(A(x)), this saves two passes over the (tokens, out) output in forward (B's product and its
    addition) and, in backward, the separate (tokens, in) gradient of x through A and its addition to the base's,
    because x's gradient through the merged weight already holds both. What it costs instead is a pass over the
    (out, in) weight, dequantized anyway. The matrix is rebuilt in backward rather than kept, as bitsandbytes does.
    A and B still get their exact gradients: s (g B)^T x and s g^T (x A^T), with g the output's gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, a, b, bias, base, scaling):
        ctx.save_for_backward(x, weight, a, b)
        ctx.base, ctx.scaling = base, scaling
        return F.linear(x, merged_weight(base, weight, a, b, scaling), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, a, b = ctx.saved_tensors
        s, needs = ctx.scaling, ctx.needs_input_grad
        grad_x = grad_out @ merged_weight(ctx.base, weight, a, b, s) if needs[0] else None
        grad_a = (grad_out @ b * s).t() @ x if needs[2] else None  # (r, in)
        grad_b = grad_out.t() @ (x @ a.t() * s) if needs[3] else None  # (out, r): A(x) recomputed, r wide
        return grad_x, None, grad_a, grad_b, None, None, None


def parse_targets(targets: str | list[str]) -> list[str]:
    """--lora_targets' comma-separated text (or a list already split) as module names or regexes, each checked to
    compile: a bad pattern is named here, before the model loads, not raised as re.error from deep in matching."""
    found = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    for target in found:
        try:
            re.compile(target)
        except re.error as e:
            raise AdapterError(f"--lora_targets: {target!r} is not a valid regular expression ({e}); a name "
                               r"matches as it is, a pattern is a Python regex (.*_proj, not the glob *_proj; \. for "
                               "a dot)") from e
    if ALL_LINEAR in found and set(found) - {ALL_LINEAR, EXPERTS}:
        raise AdapterError(f"--lora_targets: {ALL_LINEAR!r} already selects every linear of the decoder layers; give "
                           f"it alone (or with {EXPERTS!r}), or name the linears instead of it")
    return found


def matching_modules(model: nn.Module, targets: str | list[str], within: type[nn.Module]) -> dict[str, nn.Module]:
    """Linear layers inside `within` (the decoder layers) whose name ends with, or fully matches, a target pattern;
    "all-linear" selects all of them except MoE routers (_routers).

    Same rule as PEFT's target_modules, so the saved list selects the same layers when PEFT loads the adapter; for
    "all-linear", PEFT takes every nn.Linear but the output embedding, which on a model without experts is the same
    set (tests/test_lora.py compares them). lm_head and the embeddings are outside the decoder layers, so they are never
    adapted.
    """
    targets, linears = [t for t in parse_targets(targets) if t != EXPERTS], _layer_linears(model, within)
    routers = _routers(model, linears) if targets == [ALL_LINEAR] else set()
    return {name: module for name, module in linears.items()
            if name not in routers and any(matches(t, name) for t in targets)}


def _layer_linears(model: nn.Module, within: type[nn.Module]) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder layers (nn.Linear or a 4-bit one), by its path; none of LoRA's own."""
    inside_layers = inside(model, within)
    return {name: module for name, module in model.named_modules()
            if id(module) in inside_layers and hasattr(module, "in_features") and not isinstance(module, LoRAFactor)}


def inside(model: nn.Module, within: type[nn.Module]) -> set[int]:
    """The ids of every module inside the decoder layers (`within`)."""
    return {id(m) for layer in model.modules() if isinstance(layer, within) for m in layer.modules()}


def _routers(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """The MoE routers among `linears` (model_loading.moe_routers): "all-linear" leaves them frozen, as the loader
    leaves them bf16; naming them adapts them."""
    return model_loading.moe_routers(model) & linears.keys()


def matches(target: str, name: str) -> bool:
    """PEFT's rule for a target_modules entry (the name, or its suffix after a dot: "self_attn.q_proj"), or a regex
    that matches the whole name."""
    return (target == ALL_LINEAR or name == target or name.endswith(f".{target}")
            or re.fullmatch(target, name) is not None)


def kinds(names) -> list[str]:
    """Short names of linear layers, as PEFT's target_modules lists them: "model.layers.0.mlp.up_proj" -> up_proj."""
    return sorted({name.split(".")[-1] for name in names})


def split_targets(targets: str | list[str]) -> tuple[list[str], bool]:
    """--lora_targets as the linears' patterns and the "experts" switch (moe_lora.py adapts the experts)."""
    found = parse_targets(targets)
    return [t for t in found if t != EXPERTS], EXPERTS in found


def inject_lora(model: nn.Module, targets: list[str], within: type[nn.Module], r: int, alpha: float,
                dropout: float, device: torch.device | str, adapter: type[LoRALinear] = LoRALinear,
                warn: bool = True) -> list[str]:
    """Replace each linear the targets select with an `adapter` (LoRALinear, or a variant of it) around it, its
    weights on `device`; returns the adapted names.

    A's random init is drawn on `device`, from torch's global generator for that device: seed it identically on every
    rank (FSDP does not broadcast). A target that matches nothing in some decoder layer is warned about (`warn`: for
    --lora_targets; an adapter file's targets are whatever its writer listed, such as one layer's full path).
    """
    linears, _ = split_targets(targets)
    found = matching_modules(model, linears, within) if linears else {}
    have = kinds(_layer_linears(model, within))  # what the decoder layers have; lm_head is not among them
    if linears and not found:
        raise AdapterError(f"--lora_targets {linears} match no linear layer in the decoder layers; they have {have}")
    layers = [name for name, m in model.named_modules() if isinstance(m, within)]
    for target in linears if warn else []:
        missed = [layer for layer in layers if not any(matches(target, n) for n in found if n.startswith(layer + "."))]
        if missed:
            warnings.warn(f"--lora_targets {target!r} matches nothing in {len(missed)} of {len(layers)} decoder layers "
                          f"(first: {missed[0]}); their linears are {have}")
    for name, base in found.items():
        model.set_submodule(name, adapter(base, r, alpha, dropout, device))
    return list(found)


def lora_modules(model: nn.Module) -> dict[str, Adapter]:
    """Every adapter of a model by its path (with FSDP's wrappers in it, where the model is wrapped:
    fsdp_wrap.clean_name removes them)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}


def adapter_weights(modules: dict[str, Adapter]) -> dict[str, torch.Tensor]:
    """Each trainable weight of the adapters by its key in the model's state dict, "<path>.lora_A.weight": for a
    linear PEFT's key, unprefixed; for experts "<experts>.lora_experts.<tensor>.lora_A.weight", which
    peft_format.peft_keys renames. The order is the modules' (an experts class's tensors in their declared order), as
    peft_keys needs it."""
    return {f"{path}.{name}.weight": getattr(module, name).weight
            for path, module in modules.items() for name in module.adapter_params()}
