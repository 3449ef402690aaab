"""LoRA: a trainable low-rank update beside each frozen (4-bit) linear layer, saved in PEFT's format."""
import json
import math
import re
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.utils import skip_init

import cli
import model_loading
import out_folder
import quantization
from settings import ALL_LINEAR, EXPERTS

PEFT_PREFIX = "base_model.model."  # PEFT names every key after the path of the LoRA layer inside its wrapper
FACTORS = ("lora_A", "lora_B")


class AdapterError(cli.Refusal):
    """An adapter, or a --lora_targets, that does not fit the model; the message says why and what to pass instead."""


class LoRAFactor(nn.Linear):
    """A or B: an fp32 master weight used in the input's dtype (bf16). Under FSDP the weight already arrives as bf16;
    unwrapped (tests, merging) the cast happens here, or in LoRALinear where it uses the weight directly, so both
    paths compute the same thing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class LoRALinear(nn.Module):
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
        self.lora_A, self.lora_B = _factors(base.in_features, r, base.out_features, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)  # (tokens, features)
        out = self.merged(rows) if self.merges(rows) else self.unmerged(rows)
        return out.view(*x.shape[:-1], out.shape[-1])

    def merges(self, rows: torch.Tensor) -> bool:
        """Whether to add the update to the weight instead of to the output.

        Only without dropout, which applies to the update's input alone. Then always in training: one GEMM and one
        autograd node instead of four, forward and backward. On one H100, batch 1 x 2048 tokens of an 8B model went
        from 2,703 to 3,764 tokens/s in one run and from 2,509 to 2,932 in another, although the weight (out x in)
        is larger than the output there. Without gradients, only when the weight is smaller than the output (more
        rows than input features): not in generation, where bitsandbytes multiplies by the 4-bit weight directly.
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


def _factors(inp: int, rank: int, out: int, device: torch.device | str) -> tuple[LoRAFactor, LoRAFactor]:
    """A (inp -> rank) Kaiming-uniform, as nn.Linear and PEFT initialise it, and B (rank -> out) zero, both fp32.

    skip_init: nn.Linear's own init would draw a random A and B, both overwritten here. Skipping it takes adding LoRA
    to an 8B model (224 adapters, 168M parameters at r=64) from about 1.3 to 1.0 s on a 2-core CPU."""
    a = skip_init(LoRAFactor, inp, rank, bias=False, dtype=torch.float32, device=device)
    b = skip_init(LoRAFactor, rank, out, bias=False, dtype=torch.float32, device=device)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


def add_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A as a new matrix, in the dtype of its inputs: the one place the merged weight is computed
    (in training, bf16; merge.py, fp32)."""
    return torch.addmm(weight, b, a, alpha=scaling)


class ExpertsLoRA(nn.Module):
    """LoRA on one MoE layer's experts tensor W, (experts, out, in): expert e computes with W_e + B_e A_e * alpha / r.

    The factors are laid out as PEFT's ParamWrapper keeps them (peft/tuners/lora/layer.py), so the adapter file needs
    no conversion: A is (r * experts, in), expert e's rows at [e * r, (e + 1) * r); B is (out, r * experts) with the
    expert index LAST, i.e. B viewed as (out, r, experts). Init as LoRALinear: A Kaiming-uniform, B zero. No dropout:
    PEFT's ParamWrapper adds the update to the weight, where dropout of the input has no place, and refuses it; an
    adapter trained with it would mean something else there.
    """

    def __init__(self, shape: tuple[int, int, int], r: int, alpha: float, device: torch.device | str = "cpu"):
        super().__init__()
        self.experts, out, inp = shape
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A, self.lora_B = _factors(inp, r * self.experts, out, device)

    def update(self, dtype: torch.dtype) -> torch.Tensor:
        """scaling * B_e @ A_e for every expert e, (experts, out, in), in `dtype` (fp32 masters; bf16 under FSDP)."""
        a, b = expert_factors(self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype), self.experts)
        return torch.bmm(b, a) * self.scaling


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ExpertsLoRA's A (r * experts, in) and B (out, r * experts) as each expert's factors: (experts, r, in) and
    (experts, out, r)."""
    r = a.shape[0] // experts
    return a.view(experts, r, -1), b.view(-1, r, experts).permute(2, 0, 1)


def add_experts_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_e + scaling * B_e @ A_e for every expert e of an experts tensor W (experts, out, in), as a new tensor, from
    ExpertsLoRA's factors; PEFT's ParamWrapper.get_delta_weight computes the same update (merge.py, in fp32)."""
    a, b = expert_factors(a, b, weight.shape[0])
    return torch.baddbmm(weight, b, a, alpha=scaling)


def _forward_with_lora(experts: nn.Module, *args, **kwargs):
    if groups_by_expert(experts):
        return _grouped_forward(experts, *args, **kwargs)
    # Another experts class: each adapted tensor, dense (dequantized from 4 bits, or the 16-bit parameter), plus its
    # update; the class's own forward then runs on the sums (quantization.forward_with).
    weights = _dense_weights(experts)
    for name, adapter in experts.lora_experts.items():
        weights[name] = weights[name] + adapter.update(weights[name].dtype)
    return quantization.forward_with(experts, weights, *args, **kwargs)


def _dense_weights(experts: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' 3-D tensors that LoRA adapts or that are packed, as dense COMPUTE tensors (no gradient)."""
    packed = getattr(experts, "packed", {})
    return {name: m() for name, m in packed.items()} | {
        name: getattr(experts, name) for name in experts.lora_experts if name not in packed}


def groups_by_expert(experts: nn.Module) -> bool:
    """An experts class that transformers' use_experts_implementation describes (has_gate, is_transposed, ...): its
    computation is known, so _grouped_forward can run it with the updates applied to the activations. Expert
    parallelism is not (it routes tokens to other ranks)."""
    return hasattr(experts, "has_gate") and not getattr(experts, "_is_expert_parallel", False)


def _grouped_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward with LoRA on the routed tokens (routed_experts), from this module's tensors: the dense
    weights (dequantized here, eagerly: bitsandbytes' kernels and FSDP's views are never traced), the factors in the
    compute dtype, the biases. `experts.routed` is routed_experts compiled (fused.compile_elementwise), where set."""
    weights = _dense_weights(experts)
    names = ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")
    dense = {name: weights[name] if name in weights else getattr(experts, name) for name in names}
    dtype = hidden_states.dtype
    factors = {}
    for name, adapter in experts.lora_experts.items():
        a, b = expert_factors(adapter.lora_A.weight.to(dtype), adapter.lora_B.weight.to(dtype), adapter.experts)
        # B's expert index is its last: the grouped kernel needs each expert's block in one piece. Made so here, as
        # an input of the compiled graph, whose own layout choices may not keep it.
        factors[name] = (a, b.contiguous(), adapter.scaling)
    if hasattr(experts, "routed"):  # compiled: a known gate, no biases, no post-expert norm (compile_elementwise)
        return experts.routed(hidden_states, top_k_index, top_k_weights, dense, factors)
    biases = {name: getattr(experts, f"{name}_bias") for name in names} if experts.has_bias else {}
    return routed_experts(hidden_states, top_k_index, top_k_weights, dense, factors, experts.is_transposed,
                          experts._apply_gate if experts.has_gate else experts.act_fn, biases,
                          experts.post_expert_norm if experts.has_post_expert_norm else None)


def routed_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   dense: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                   transposed: bool, gate, biases: dict[str, torch.Tensor] | None = None,
                   post_norm: nn.Module | None = None) -> torch.Tensor:
    """transformers' grouped_mm experts forward (integrations/moe.py: tokens sorted by expert, one grouped matmul per
    projection, gate, routing weights, tokens restored) with each adapted projection's LoRA applied to its input,
    x W_e^T + s (x A_e^T) B_e^T, instead of to the weight. dense: the two projections' (experts, out, in) weights
    ((experts, in, out) if `transposed`), gate_up_proj (or up_proj) first; factors: each adapted projection's
    A_e (experts, r, in), B_e (experts, out, r) and scaling; gate: gate_up's (or up's) output -> the down
    projection's input. Compiled, it takes tensors and constants only (fused.compile_elementwise), so that one graph
    serves every layer.

    Why on the input: with W_e + s B_e A_e as the weight, backward computes the gradient of the whole (experts, out,
    in) weight, one more matmul as large as the forward's plus a write of the weight's size, only to reduce it to A's
    and B's. Here the frozen base gets no weight gradient at all, and the low-rank products are r wide.
    """
    (first, first_w), (down, down_w) = dense.items()
    n_experts, top_k = first_w.shape[0], top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // top_k]
    # each expert's rows end where the sorted ids pass its number; unlike bincount, no wait for the GPU (a sync)
    ends = torch.arange(n_experts, device=expert_ids.device, dtype=expert_ids.dtype)
    offsets = torch.searchsorted(expert_ids, ends, right=True).to(torch.int32)

    def project(x: torch.Tensor, name: str, weight: torch.Tensor) -> torch.Tensor:
        out = _grouped_mm(x, weight if transposed else weight.transpose(1, 2), offsets)
        if name in factors:
            a, b, scaling = factors[name]
            if transposed:  # x B_e A_e s for a tensor stored (experts, in, out)
                out = out + _grouped_mm(_grouped_mm(x, b, offsets) * scaling, a, offsets)
            else:
                out = out + _grouped_mm(_grouped_mm(x, a.transpose(1, 2), offsets) * scaling, b.transpose(1, 2),
                                        offsets)
        if biases:
            out = out + biases[name][expert_ids]
        return out

    out = project(gate(project(x, first, first_w)), down, down_w)
    if post_norm is not None:
        out = post_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    restored = torch.empty_like(out).index_copy_(0, perm, out)  # back to (token, k) order, then summed over k
    return restored.view(-1, top_k, out.size(-1)).sum(dim=1).to(hidden_states.dtype)


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (tokens sorted by expert, in) @ weight[e] (experts, in, out) for each expert's rows (offsets: their ends).
    torch's grouped kernel takes bf16 with 16-byte aligned strides (a LoRA rank of 8 or more); anything else, an fp32
    test or a rank of 4, goes expert by expert."""
    if x.dtype == weight.dtype == torch.bfloat16 and all(s * 2 % 16 == 0 for s in (*weight.shape[1:], x.shape[1])):
        return F.grouped_mm(x, weight, offs=offsets)
    ends = offsets.tolist()
    return torch.cat([x[start:end] @ weight[e].to(x.dtype) for e, (start, end) in enumerate(zip([0] + ends, ends))])


def expert_tensors(model: nn.Module, within: type[nn.Module]) -> dict[str, tuple[nn.Module, str, tuple[int, ...]]]:
    """Every MoE experts tensor inside the decoder layers, "<experts path>.<name>" -> (experts module, name, shape),
    16-bit or packed, in the order the experts class declares them (PEFT nests its wrappers in that order)."""
    inside = _inside(model, within)
    found = {}
    for path, block in model.named_modules():  # an MoE block: the module holding `experts` (model_loading.moe_routers)
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module) or id(experts) not in inside:
            continue
        packed = getattr(experts, "packed", {})  # quantization.pack_experts keeps the declared order
        dense = {n: tuple(p.shape) for n, p in experts.named_parameters(recurse=False) if p.dim() == 3}
        for name, shape in {**{n: m.shape for n, m in packed.items()}, **dense}.items():
            found[f"{path}.experts.{name}"] = (experts, name, tuple(shape))
    return found


def inject_experts_lora(model: nn.Module, within: type[nn.Module], r: int, alpha: float,
                        device: torch.device | str) -> list[str]:
    """An ExpertsLoRA for every experts tensor, in `experts.lora_experts`, and the forward that adds their updates;
    returns the tensors' names."""
    found = expert_tensors(model, within)
    for name, (experts, attr, shape) in found.items():
        if not hasattr(experts, "lora_experts"):
            experts.lora_experts = nn.ModuleDict()
            experts.forward = types.MethodType(_forward_with_lora, experts)
        experts.lora_experts[attr] = ExpertsLoRA(shape, r, alpha, device)
    return list(found)


def _merged_weight(base: nn.Module, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """W + scaling * B @ A as a new bf16 (out, in) matrix, W dequantized from 4 bits or taken as it is."""
    return add_update(quantization.dequantize(weight, base) if quantization.is_4bit(base) else weight, a, b, scaling)


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
        return F.linear(x, _merged_weight(base, weight, a, b, scaling), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, a, b = ctx.saved_tensors
        s, needs = ctx.scaling, ctx.needs_input_grad
        grad_x = grad_out @ _merged_weight(ctx.base, weight, a, b, s) if needs[0] else None
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
            if name not in routers and any(_matches(t, name) for t in targets)}


def _layer_linears(model: nn.Module, within: type[nn.Module]) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder layers (nn.Linear or a 4-bit one), by its path; none of LoRA's own."""
    inside = _inside(model, within)
    return {name: module for name, module in model.named_modules()
            if id(module) in inside and hasattr(module, "in_features") and not isinstance(module, LoRAFactor)}


def _inside(model: nn.Module, within: type[nn.Module]) -> set[int]:
    """The ids of every module inside the decoder layers (`within`)."""
    return {id(m) for layer in model.modules() if isinstance(layer, within) for m in layer.modules()}


def _routers(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """The MoE routers among `linears` (model_loading.moe_routers): "all-linear" leaves them frozen, as the loader
    leaves them bf16; naming them adapts them."""
    return model_loading.moe_routers(model) & linears.keys()


def _matches(target: str, name: str) -> bool:
    return target == ALL_LINEAR or name.split(".")[-1] == target or re.fullmatch(target, name) is not None


def kinds(names) -> list[str]:
    """Short names of linear layers, as PEFT's target_modules lists them: "model.layers.0.mlp.up_proj" -> up_proj."""
    return sorted({name.split(".")[-1] for name in names})


def targets_on(config, targets: str | list[str]) -> dict[str, nn.Module]:
    """What `targets` select in the model `config` describes, found on a skeleton on the meta device (no memory, no
    weights): targets compared before the model loads (a resume), or handed to PEFT (benchmark.py)."""
    skeleton = model_loading.build_skeleton(config, "none")
    layer_cls = model_loading.decoder_layer_class(skeleton)
    experts = expert_tensors(skeleton, layer_cls) if EXPERTS in parse_targets(targets) else {}
    return matching_modules(skeleton, targets, layer_cls) | {name: m for name, (m, _, _) in experts.items()}


def inject_lora(model: nn.Module, targets: list[str], within: type[nn.Module], r: int, alpha: float,
                dropout: float, device: torch.device | str) -> list[str]:
    """Replace each matching linear with a LoRALinear around it, its weights on `device`; returns the adapted names.

    A's random init is drawn on `device`, from torch's global generator for that device: seed it identically on every
    rank (FSDP does not broadcast). A target that matches nothing in some decoder layer is warned about. EXPERTS
    adds an ExpertsLoRA for every MoE experts tensor (inject_experts_lora); their names come last.
    """
    targets, linears = parse_targets(targets), _layer_linears(model, within)
    experts = EXPERTS in targets
    targets = [t for t in targets if t != EXPERTS]
    if experts and not expert_tensors(model, within):
        raise AdapterError(f"--lora_targets {EXPERTS!r}: this model has no MoE experts in its decoder layers")
    if experts and dropout > 0:
        raise AdapterError(f"--lora_targets {EXPERTS!r} needs --lora_dropout 0: dropout applies to a layer's input, "
                           "which an update of the experts' weights cannot (PEFT refuses such adapters too)")
    found = matching_modules(model, targets, within) if targets else {}
    have = kinds(linears)  # what the decoder layers have; lm_head is not among them
    if targets and not found:
        raise AdapterError(f"--lora_targets {targets} match no linear layer in the decoder layers; they have {have}")
    layers = [name for name, m in model.named_modules() if isinstance(m, within)]
    for target in targets:
        missed = [layer for layer in layers if not any(_matches(target, n) for n in found if n.startswith(layer + "."))]
        if missed:
            warnings.warn(f"--lora_targets {target!r} matches nothing in {len(missed)} of {len(layers)} decoder layers "
                          f"(first: {missed[0]}); their linears are {have}")
    for name, base in found.items():
        model.set_submodule(name, LoRALinear(base, r, alpha, dropout, device))
    return list(found) + (inject_experts_lora(model, within, r, alpha, device) if experts else [])


ADAPTERS = (LoRALinear, ExpertsLoRA)  # the modules that hold an A and a B


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | ExpertsLoRA]:
    """Every LoRALinear and ExpertsLoRA of an unwrapped model by its path (fsdp_wrap.lora_modules for a wrapped one)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTERS)}


def factor_weights(modules: dict[str, LoRALinear | ExpertsLoRA]) -> dict[str, torch.Tensor]:
    """Each A and B weight by its key in the model's state dict, "<path>.lora_A.weight": for a linear PEFT's key,
    unprefixed; for experts "<experts>.lora_experts.<tensor>.lora_A.weight", which peft_keys renames. The order is
    the modules' (an experts class's tensors in their declared order), as peft_keys needs it."""
    return {f"{path}.{ab}.weight": getattr(module, ab).weight for path, module in modules.items() for ab in FACTORS}


def peft_key(key: str) -> str:
    """"<path>.lora_A.weight" as PEFT's adapter file names it: after the path of the model inside PEFT's wrappers."""
    return PEFT_PREFIX + key


def peft_keys(keys) -> dict[str, str]:
    """factor_weights' keys (in its order) -> the adapter file's.

    PEFT adapts a parameter by wrapping its module in a ParamWrapper; a second parameter of the same module wraps
    that wrapper again, in the order the module declares its parameters (tuners_utils' _inject_parameters walks
    named_parameters). So the LAST declared tensor's factors sit at "<experts>.lora_A.weight", the one before it at
    "<experts>.base_layer.lora_A.weight", and so on: gate_up_proj, then down_proj, gives down_proj the outer one.
    """
    keys, renamed = list(keys), {}
    tensors = {}  # "<experts>" -> its adapted tensors in order
    for key in keys:
        if ".lora_experts." in key:
            experts, _, rest = key.partition(".lora_experts.")
            names = tensors.setdefault(experts, [])
            if rest.split(".")[0] not in names:
                names.append(rest.split(".")[0])
    for key in keys:
        if ".lora_experts." not in key:
            renamed[key] = peft_key(key)
            continue
        experts, _, rest = key.partition(".lora_experts.")
        name, _, factor = rest.partition(".")
        depth = len(tensors[experts]) - 1 - tensors[experts].index(name)
        renamed[key] = peft_key(f"{experts}.{'base_layer.' * depth}{factor}")
    return renamed


def expert_peft_keys(tensors: list[str]) -> dict[str, tuple[str, str]]:
    """Experts tensors, "<experts path>.<tensor>" as expert_tensors names them (in its order) -> the adapter file's
    keys of their lora_A and lora_B (peft_keys), for a reader of the file that has no model to inject (merge.py)."""
    factors = {t: [f"{t.rpartition('.')[0]}.lora_experts.{t.rpartition('.')[2]}.{ab}.weight" for ab in FACTORS]
               for t in tensors}
    renamed = peft_keys(key for pair in factors.values() for key in pair)
    return {t: (renamed[a], renamed[b]) for t, (a, b) in factors.items()}


def expert_targets(keys) -> list[str]:
    """target_parameters for adapter_config.json: "experts.<tensor>" for each adapted experts tensor, which PEFT
    matches as a suffix of "<experts path>.<tensor>"."""
    tensors = {k.partition(".lora_experts.")[2].split(".")[0] for k in keys if ".lora_experts." in k}
    return sorted(f"{EXPERTS}.{name}" for name in tensors)


# ----------------------------------------------------------------------------------------------------------------------
# PEFT format: adapter_model.safetensors with keys "base_model.model.<path>.lora_A.weight", plus adapter_config.json.
# vLLM serves such a folder as it is (no modules_to_save, no DoRA), at a rank up to its --max-lora-rank.

# The values vLLM's --max-lora-rank takes (vllm/config/lora.py; later releases also take 1). vLLM sizes every
# adapter slot at that rank and copies a smaller adapter into the slot's first rows, zeros after them.
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
BASE_FINGERPRINT = "base_fingerprint"  # the adapter file's metadata key for its base (save_adapter)


def vllm_max_lora_rank(r: int) -> int | None:
    """The --max-lora-rank vLLM serves an adapter of rank r with: the smallest it takes that holds r; None above all."""
    return next((v for v in VLLM_MAX_RANKS if v >= r), None)


def vllm_rank_warning(r: int) -> str | None:
    """Why vLLM will not serve an adapter of rank r as one of its own ranks, or None when it will."""
    up = vllm_max_lora_rank(r)
    if up == r:
        return None
    if up is None:
        return (f"--lora_rank {r} is above {VLLM_MAX_RANKS[-1]}, the largest rank vLLM serves: serve this adapter "
                "merged into its base (merge.py) instead")
    return (f"--lora_rank {r} is not a rank vLLM's --max-lora-rank takes ({', '.join(map(str, VLLM_MAX_RANKS))}): "
            f"vLLM serves this adapter with --max-lora-rank {up}, in slots of that rank (zeros after row {r})")


def save_adapter(state: dict[str, torch.Tensor], out_dir: Path, r: int, alpha: float, dropout: float,
                 base_model: str, base_fingerprint: str | None = None) -> None:
    """`state` maps "<path>.lora_A.weight" / "<path>.lora_B.weight" to full (unsharded) tensors. The base's
    model_loading.fingerprint goes into the weights file's metadata (BASE_FINGERPRINT), where PEFT and vLLM do not
    look and from which it never parts: merge.py and generate.py compare it with the base they are given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = peft_keys(state)
    tensors = {names[k]: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    base = {BASE_FINGERPRINT: base_fingerprint} if base_fingerprint else {}
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt", **base})
    out_folder.readable(out_dir / "adapter_model.safetensors")
    linears = [k for k in state if ".lora_experts." not in k]
    targets = kinds(k.split(".lora_")[0] for k in linears)  # the layers adapted, never "all-linear": PEFT, vLLM read it
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    if expert_targets(state):  # MoE experts' tensors (ExpertsLoRA), loaded by PEFT 0.21's ParamWrapper
        config["target_modules"] = targets or None  # PEFT takes an empty list as "no match", None as "none asked"
        config["target_parameters"] = expert_targets(state)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def trained_fingerprint(adapter_dir: Path) -> str | None:
    """The fingerprint of the base the adapter was trained on, as save_adapter records it; None from other tools."""
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        return (f.metadata() or {}).get(BASE_FINGERPRINT)


def load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Copy a PEFT-format adapter into the LoRALinear modules of an unwrapped model (before FSDP)."""
    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    weights = factor_weights(lora_modules(model))
    names = peft_keys(weights)
    wanted = {names[k]: weight for k, weight in weights.items()}
    if set(tensors) != set(wanted):
        missing, unexpected = sorted(wanted.keys() - tensors.keys()), sorted(tensors.keys() - wanted.keys())
        raise AdapterError(f"adapter in {adapter_dir} does not fit this model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]} (different base model, rank or targets?)")
    with torch.no_grad():
        for key, dst in wanted.items():
            if tensors[key].shape != dst.shape:
                raise AdapterError(f"{key} has shape {list(tensors[key].shape)} in the adapter, {list(dst.shape)} here")
            dst.copy_(tensors[key])


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter we can apply, or an error that says what is missing or unsupported."""
    adapter_dir = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"no {name} in {adapter_dir}: pass --adapter the output_dir of a training run "
                               "(or one of its checkpoint-N folders)")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "use_dora": config.get("use_dora"),
                   "fan_in_fan_out": config.get("fan_in_fan_out"), "modules_to_save": config.get("modules_to_save"),
                   "rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern")}
    if any(unsupported.values()):
        raise AdapterError(f"{adapter_dir / 'adapter_config.json'} uses {[k for k, v in unsupported.items() if v]}: "
                           "only plain LoRA adapters (as train.py saves them) are supported")
    _check_rank(adapter_dir, config)
    return config


def _check_rank(adapter_dir: Path, config: dict) -> None:
    """Every linear's lora_A has adapter_config.json's r rows, from the file's header: a config beside another
    adapter's weights is named as such, before a model loads. (An experts tensor's A has r rows per expert, a count
    only the base knows: merge.py and load_adapter check those shapes.)"""
    experts = [t.rpartition(".")[0] for t in config.get("target_parameters") or []]  # "experts.gate_up_proj": experts
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            path, _, factor = key.rpartition(".lora_")
            path = path.replace(".base_layer", "")  # PEFT nests a module's second adapted tensor (peft_keys)
            if factor != "A.weight" or any(path == e or path.endswith(f".{e}") for e in experts):
                continue
            shape = f.get_slice(key).get_shape()
            if shape[0] != config["r"]:
                raise AdapterError(f"{adapter_dir / 'adapter_config.json'} says r={config['r']}, but the adapter's "
                                   f"tensors have rank {shape[0]} ({key} is {shape}): the config belongs to another "
                                   f"adapter. Put the adapter's own config beside it, or write r={shape[0]} in it")


def adapter_scaling(config: dict) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA (PEFT's use_rslora)."""
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def _check_fits(model: nn.Module, layer_cls: type[nn.Module], targets: list[str], adapter_dir: Path,
                config: dict) -> None:
    """The adapter's targets are in this model: else it was trained on another base, which the refusal says, rather
    than inject_lora's words about a --lora_targets nobody gave."""
    another = (f"it was trained on another base ({config.get('base_model_name_or_path')!r}); apply it to that one")
    if config.get("target_parameters") and not expert_tensors(model, layer_cls):
        raise AdapterError(f"the adapter in {adapter_dir} adapts MoE experts (target_parameters "
                           f"{config['target_parameters']}), and this model has none: {another}")
    if targets and not matching_modules(model, targets, layer_cls):
        raise AdapterError(f"the adapter in {adapter_dir} adapts {targets} (target_modules), which match no linear "
                           f"layer of this model: {another}")


def apply_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """The model as trained: LoRA injected into the (4-bit) base with the adapter's own r, alpha and targets, then
    its weights loaded. The inverse of save_adapter; for inference (dropout is off in eval mode)."""
    config = read_adapter_config(adapter_dir)
    targets = config.get("target_modules") or []  # None when only experts' tensors are adapted
    targets = [targets] if isinstance(targets, str) else list(targets)  # PEFT allows one regex string
    layer_cls = model_loading.decoder_layer_class(model)
    _check_fits(model, layer_cls, targets, adapter_dir, config)
    if config.get("target_parameters"):  # every experts tensor, as train.py adapts them; load_adapter checks the keys
        targets.append(EXPERTS)
    device = next(model.parameters()).device
    inject_lora(model, targets, layer_cls, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), device)
    for module in lora_modules(model).values():
        module.scaling = adapter_scaling(config)
    load_adapter(model, adapter_dir)
