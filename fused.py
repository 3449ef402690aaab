"""The model's own math, computed leaner: the chunked loss, the compiled elementwise work of the decoder layers, and
the tiled MLP.

Nothing here changes what is computed (each replacement is checked against the module it replaces); only how much
memory and how many kernels it takes. Everything is applied to the model instance built for training: transformers'
modules, and any other model in the process, are left as they are.
"""
import functools
import inspect
import types
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

import moe_lora


def head_transforms(config) -> tuple[float, float | None]:
    """(scale, softcap): what a model does to lm_head's output before its loss. Cohere multiplies the logits by
    logit_scale, Granite divides them by logits_scaling, Gemma 2 and 3 soft-cap them. check_loss refuses a model that
    does something else."""
    scale = (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
    return scale, getattr(config, "final_logit_softcapping", None)


class CausalLMWithLoss(nn.Module):
    """The model and its loss in one forward, so that FSDP's root unit spans lm_head and the loss.

    The loss never materialises the logits of the whole batch: at batch 8 x 2048 tokens a 128k vocabulary means 4 GiB of
    bf16 logits, 8 GiB more in fp32 for the softmax, and as much again for their gradient. Instead lm_head, the model's
    own logit transforms (head_transforms) and the fp32 cross-entropy run over chunks of tokens, each recomputed in
    backward (checkpointed), costing one extra lm_head matmul. Called without labels it is the plain transformers
    model (logits), for sampling and for check_loss.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 4096, compile: str | None = None):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens
        self.scale, self.softcap = head_transforms(model.config)
        # Compiled, the upcast, softmax and loss read each bf16 logit once, and backward writes its gradient once in
        # bf16; eagerly, every step passes over a chunk's fp32 logits (2 GiB at 4,096 tokens and 128k words).
        self.logits_loss = torch.compile(_logits_loss, backend=compile) if compile else _logits_loss

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs):
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        hidden, labels = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # token t predicts token t+1
        if len(labels) == 0:  # rows of one token predict nothing; zero still reaches every LoRA weight in backward,
            return hidden.sum() * 0.0  # whose FSDP hooks must fire on every rank for gradients to be reduced
        weight = self.model.get_output_embeddings().weight
        return sum(checkpoint(self._chunk_loss, hidden[i:i + self.chunk_tokens], weight,
                              labels[i:i + self.chunk_tokens], use_reentrant=False)
                   for i in range(0, len(labels), self.chunk_tokens))

    def _chunk_loss(self, hidden, weight, labels):
        return self.logits_loss(F.linear(hidden, weight), labels, self.scale, self.softcap)


def _logits_loss(logits: torch.Tensor, labels: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The summed cross-entropy of bf16 logits, in fp32; labels of -100 (prompt, padding) are ignored."""
    logits = logits.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


@torch.no_grad()
def check_loss(model: nn.Module, batch: dict[str, torch.Tensor], model_type: str, rtol: float = 2e-2) -> None:
    """The chunked loss equals the cross-entropy of the model's own logits (its own head, whatever it scales or caps)
    on `batch`, within bf16 rounding; else an error naming the model type and both numbers, before the first step.
    A model that transforms its logits in a way head_transforms does not know can then never train on another
    objective than its own. Logits that are not finite are no head's doing: the error then names the damaged layer
    (nonfinite_logits). `model` is the CausalLMWithLoss (FSDP-wrapped or not): a collective under FSDP."""
    was_training = model.training
    model.eval()  # no dropout: both sides see the same weights
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # Eager: the compiled functions would first be traced for this short row, then again, with dynamic shapes, for
    # the training rows. (The compiled kernels' own numbers are a test's business, tests/test_training.py.)
    with torch.compiler.set_stance("force_eager"):
        ours = model(**batch).float()
        logits = model(**inputs).logits
        own = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                              reduction="sum")
        if not (ours.isfinite() and own.isfinite()):
            raise ValueError(f"{model_type}, on the first rows: {nonfinite_logits(model, lambda: model(**inputs))}")
    model.train(was_training)
    if not torch.isclose(ours, own, rtol=rtol, atol=1e-3 * batch["labels"].numel()):
        raise ValueError(f"{model_type}: the chunked loss ({ours.item():.4f}) is not the model's own loss "
                         f"({own.item():.4f}) on the first rows: its head transforms the logits in a way "
                         "fused.head_transforms does not reproduce; add it there before training this architecture")


def nonfinite_logits(model: nn.Module, forward: Callable[[], object]) -> str:
    """Why the logits are NaN or inf, for a refusal: the first module whose output is not finite when `forward` runs
    `model` again (a collective under FSDP), by its path in the transformers model. A leaf's output goes bad first,
    so this is the layer holding the damaged weight, or its LoRA factor; LoRALinear is named for its base layer."""
    hf = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    # Wrappers (FSDP, activation checkpointing, compile, LayerAdapters) hold a module under a private attribute
    names = {id(m): ".".join(p for p in name.split(".") if not p.startswith("_")) for name, m in hf.named_modules()}
    first = []

    def record(module: nn.Module, args, output) -> None:
        if (not first and id(module) in names and isinstance(output, torch.Tensor) and output.is_floating_point()
                and not output.isfinite().all()):
            first.append(names[id(module)].removesuffix(".base"))

    hooks = [m.register_forward_hook(record) for m in hf.modules()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    where = f"the first module whose output is not finite is {first[0]}" if first else "no one module's output shows it"
    return (f"the logits are not finite (NaN or inf): {where}. A weight is damaged, in --model's checkpoint or in "
            "the adapter: download or write it again")


# The elementwise work between the matmuls, written as functions of tensors alone, for torch.compile to fuse. Each
# replaces a transformers module only where it computes exactly what that module computes (compile_elementwise).
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    h = x.float()  # statistics in fp32, as transformers computes them
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if plus_one:  # Gemma: scale by (1 + w) in fp32, then round
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)  # Llama, Mistral, Qwen: round, then scale by w


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def _halves(fn, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # transformers' default experts gate (integrations/moe.py)
    return fn(gate, up)


def _fused_norm(norm: nn.Module, fn, eps: float, plus_one: bool, x: torch.Tensor) -> torch.Tensor:
    return fn(x, norm.weight, eps, plus_one)  # norm.weight read at each call: FSDP swaps in a new view per forward


def _fused_mlp(mlp: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(fn(mlp.gate_proj(x), mlp.up_proj(x)))  # transformers' gated MLP


def _norm_variant(norm: nn.Module) -> tuple[float, bool] | None:
    """(eps, plus_one) if _rms_norm computes exactly what `norm` does on a random input, else None."""
    eps, weight = getattr(norm, "variance_epsilon", getattr(norm, "eps", None)), getattr(norm, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    x = torch.randn(2, 3, weight.numel(), dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        want = norm(x)
        return next(((eps, p) for p in (False, True) if torch.equal(_rms_norm(x, weight, eps, p), want)), None)


def _activation_variant(act_fn: nn.Module):
    """The fused gate function that computes exactly what act_fn(gate) * up does, or None."""
    gate = torch.randn(64, dtype=torch.bfloat16)
    with torch.no_grad():
        return next((fn for fn, act in ((_silu_mul, F.silu), (_gelu_tanh_mul, lambda t: F.gelu(t, approximate="tanh")))
                     if torch.equal(act_fn(gate), act(gate))), None)


# From how many routed rows (tokens x experts per token) on a layer the compiled experts pay. Compiled, a layer's
# experts take fewer GPU kernels and less GPU time, but more CPU time to launch them, and a step at a few thousand
# tokens is bound by the CPU: compiled was slower at half this many rows and faster at this many, on one H200
# (BENCHMARKS.md, "When the MoE experts are compiled").
COMPILED_FROM_ROWS = 131_072


def _routed_by_size(compiled, hidden_states: torch.Tensor, top_k_index: torch.Tensor, *args, **kwargs):
    """moe_lora.routed_experts compiled from COMPILED_FROM_ROWS routed rows on, eager below: the same computation."""
    routed = compiled if top_k_index.numel() >= COMPILED_FROM_ROWS else moe_lora.routed_experts
    return routed(hidden_states, top_k_index, *args, **kwargs)


def _experts_gate(experts: nn.Module):
    """The fused gate that computes exactly what an experts module's _apply_gate does, when routed_experts can be
    compiled for it: LoRA on it, a gate, no biases, no norm after the experts; else None."""
    if not (moe_lora.groups_by_expert(experts) and hasattr(experts, "lora_experts") and experts.has_gate
            and not experts.has_bias and not experts.has_post_expert_norm):
        return None
    fn = _activation_variant(experts.act_fn)
    gate_up = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        return fn if fn is not None and torch.equal(experts._apply_gate(gate_up), _halves(fn, gate_up)) else None


def compile_elementwise(model: nn.Module, layer_cls: type[nn.Module], backend: str = "inductor") -> None:
    """Fuse the memory-bound work between the matmuls of every decoder layer with torch.compile, in place.

    Eagerly, each elementwise op reads and writes whole activations: transformers' RMSNorm makes six passes (upcast,
    square, mean, scale, downcast, weight), and at 8 x 2048 tokens a gate_proj output is 450 MB. Compiled, each piece
    below is one kernel (BENCHMARKS.md has the speed). The matmuls stay eager, so bitsandbytes' kernels and FSDP's
    parameter views are never traced. The pieces:
      - RMSNorms (Llama-style and Gemma-style, including Qwen3's q/k norms);
      - gated MLPs (gate_proj, up_proj, down_proj, act_fn: Llama, Mistral, Qwen, Gemma): act_fn(gate) * up;
      - the rotary embedding: the modeling module's apply_rotary_pos_emb, which each attention forward looks up in
        its module's globals. Each attention module of this model gets its own copy of that forward, reading a
        private copy of those globals with the compiled function in it (_with_global): the library is untouched.
      - MoE experts with LoRA, on enough tokens (COMPILED_FROM_ROWS): everything between their dequantization and
        the layer's output (moe_lora.routed_experts: the sort by expert, gathers, grouped matmuls, LoRA, gate, routing
        weights, the sum over the k experts), one graph for all layers. Eagerly its elementwise work reads and
        writes (tokens x k) x hidden tensors several times over.
    The compiled functions take tensors only: compiling the modules themselves fused less on the GPU (the multiply
    after the activation and most of the norm stayed eager). A norm or MLP is replaced only after it computed
    exactly what the replacement computes on a random input; any other module stays as it is.
    backend="aot_eager" traces the same graphs without generating kernels (the CPU tests).
    """
    norm_fn, fused, routed = torch.compile(_rms_norm, backend=backend), {}, {}
    for layer in (m for m in model.modules() if isinstance(m, layer_cls)):
        for module in layer.modules():
            if "RMSNorm" in type(module).__name__ and (variant := _norm_variant(module)):
                module.forward = functools.partial(_fused_norm, module, norm_fn, *variant)
            elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                if (fn := _activation_variant(module.act_fn)) is not None:
                    fused.setdefault(fn, torch.compile(fn, backend=backend))
                    module.forward = functools.partial(_fused_mlp, module, fused[fn])
            elif (fn := _experts_gate(module)) is not None:
                if fn not in routed:  # one compiled function and one gate object per activation: one graph
                    routed[fn] = (torch.compile(moe_lora.routed_experts, backend=backend), functools.partial(_halves, fn))
                compiled, gate = routed[fn]
                module.routed = functools.partial(_routed_by_size, compiled, gate=gate, transposed=module.is_transposed)
            elif (rotary := _global_of(module, "apply_rotary_pos_emb")) is not None:
                fused.setdefault(rotary, torch.compile(rotary, backend=backend))
                _with_global(module, "apply_rotary_pos_emb", fused[rotary])


def _global_of(module: nn.Module, name: str):
    """The module-level function `name` that the forward of `module`'s class calls, if it calls one."""
    forward = inspect.unwrap(type(module).forward)  # past transformers' decorators (deprecated-kwarg renames)
    found = forward.__globals__.get(name) if name in forward.__code__.co_names else None
    return found if callable(found) else None


def _with_global(module: nn.Module, name: str, value) -> None:
    """Make this instance's forward see `value` as the global `name`: the class's own forward code, bound to the
    instance, with a copy of its module's globals. The modeling module and every other instance keep theirs."""
    forward = inspect.unwrap(type(module).forward)
    scope = {**forward.__globals__, name: value}
    copy = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__, forward.__closure__)
    copy.__kwdefaults__ = forward.__kwdefaults__
    module.forward = types.MethodType(copy, module)


def tile_mlps(model: nn.Module, layer_cls: type[nn.Module], tile_tokens: int) -> None:
    """Run the MLP of every decoder layer over tiles of at most `tile_tokens` tokens, each checkpointed, in place.

    An MLP works on each token alone, so tiling it changes nothing it computes. What it changes is memory at long
    sequences: an 8B model's MLP makes several (tokens x 14,336) tensors, 3.5 GiB each at 131,072 tokens, and inside
    a checkpointed layer's backward they all exist at once. Tiled, only one tile's exist: each tile keeps its input
    and output, and recomputes the rest in its own backward. The price is one more MLP forward per step (for Llama-
    shaped layers a fifth more matmul work), so it is for sequences long enough to need it.
    """
    for layer in (m for m in model.modules() if isinstance(m, layer_cls)):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"--tiled_mlp: {type(layer).__name__} has no `mlp` module to tile; leave --tiled_mlp at 0")
        mlp.forward = functools.partial(_tiled, mlp.forward, tile_tokens)  # whatever forward it has (compiled or not)


def _tiled(forward, tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    tokens = x.flatten(0, -2)  # (batch x seq, hidden): tiles may cross rows, the MLP does not see rows
    if len(tokens) <= tile_tokens:
        return forward(x)
    # Each tile as one row (1, tile, hidden): a mixture of experts' block takes (batch, seq, hidden) inputs only
    tiles = [checkpoint(forward, tile[None], use_reentrant=False) for tile in tokens.split(tile_tokens)]
    if not isinstance(tiles[0], torch.Tensor):
        raise ValueError(f"--tiled_mlp: this model's MLP returns {type(tiles[0]).__name__}, not a tensor of hidden "
                         "states; leave --tiled_mlp at 0")
    return torch.cat(tiles, dim=1).view(*x.shape[:-1], tiles[0].shape[-1])
