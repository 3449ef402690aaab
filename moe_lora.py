"""LoRA on the MoE experts' 3-D weight tensors, and the experts' forward that applies it.

A Mixtral or Qwen3-MoE layer holds all its experts of one kind in one (experts, out, in) tensor, not in linears, so
LoRALinear cannot wrap them. ExpertsLoRA keeps one A and B per expert in the layout of PEFT's ParamWrapper
(target_parameters), and the experts module's forward is replaced, on that object only, by one that adds the
updates: on the routed tokens' activations where the experts class is one transformers describes
(_grouped_forward), else on its dense weights. train.py adds these behind --lora_targets' "experts" switch.
"""
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import model_loading
import quantization
from settings import EXPERTS


class ExpertsLoRA(lora.Adapter):
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
        self.lora_A, self.lora_B = lora.factors(inp, r * self.experts, out, device)

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
    inside = lora.inside(model, within)
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


def inject_experts_lora(model: nn.Module, within: type[nn.Module], r: int, alpha: float, dropout: float,
                        device: torch.device | str) -> list[str]:
    """An ExpertsLoRA for every experts tensor, in `experts.lora_experts`, and the forward that adds their updates;
    returns the tensors' names, "<experts path>.<tensor>"."""
    found = expert_tensors(model, within)
    if not found:
        raise lora.AdapterError(f"--lora_targets {EXPERTS!r}: this model has no MoE experts in its decoder layers")
    if dropout > 0:
        raise lora.AdapterError(f"--lora_targets {EXPERTS!r} needs --lora_dropout 0: dropout applies to a layer's "
                                "input, which an update of the experts' weights cannot (PEFT refuses such adapters "
                                "too)")
    for name, (experts, attr, shape) in found.items():
        if not hasattr(experts, "lora_experts"):
            experts.lora_experts = nn.ModuleDict()
            experts.forward = types.MethodType(_forward_with_lora, experts)
        experts.lora_experts[attr] = ExpertsLoRA(shape, r, alpha, device)
    return list(found)


def targets_on(config, targets: str | list[str]) -> dict[str, nn.Module]:
    """What `targets` select in the model `config` describes, linears and (with "experts") experts tensors, found on a
    skeleton on the meta device (no memory, no weights): targets compared before the model loads (a resume), or
    handed to PEFT (benchmark.py)."""
    skeleton, layer_cls = _skeleton(config)
    linears, experts = lora.split_targets(targets)
    found = expert_tensors(skeleton, layer_cls) if experts else {}
    return lora.matching_modules(skeleton, linears, layer_cls) | {name: m for name, (m, _, _) in found.items()}


def check_targets(config, targets: str | list[str]) -> None:
    """`targets` injected as train.py injects them, into a skeleton of the model `config` describes (meta device: no
    memory, no weights): targets that select nothing ('experts' on a dense model, a linear the layers lack) are
    refused with the injection's own error before the data is tokenized and the model loads."""
    skeleton, layer_cls = _skeleton(config)
    linears, experts = lora.split_targets(targets)
    if linears:  # the warnings of targets missing from some layers come once, at the real injection
        lora.inject_lora(skeleton, linears, layer_cls, 1, 1.0, 0.0, "meta", warn=False)
    if experts:
        inject_experts_lora(skeleton, layer_cls, 1, 1.0, 0.0, "meta")


def _skeleton(config) -> tuple[nn.Module, type[nn.Module]]:
    """The model `config` describes, on the meta device (no memory, no weights), and its decoder-layer class."""
    skeleton = model_loading.build_skeleton(config, "none")
    return skeleton, model_loading.decoder_layer_class(skeleton)
