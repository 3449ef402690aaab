"""Shard the model with FSDP1 and checkpoint its decoder layers: the one place that knows about either.

Order matters and is fixed: compile the elementwise work of the decoder layers (CUDA), wrap (per decoder layer two FSDP
units, one for its frozen weights and one around it for its LoRA weights; the root spans the embeddings, lm_head and
the loss), then put activation checkpointing inside each decoder-layer unit, as torchtitan and the FSDP-QLoRA recipe do.
"""
import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from lora import LoRALinear, clean_name, lora_modules

SHARDING = {
    "full_shard": ShardingStrategy.FULL_SHARD,  # params, grads and optimizer state split over all ranks (ZeRO-3)
    "shard_grad_op": ShardingStrategy.SHARD_GRAD_OP,  # params kept whole between forward and backward (ZeRO-2)
    "hybrid_shard": ShardingStrategy.HYBRID_SHARD,  # full_shard inside a node, replicated across nodes
    "no_shard": ShardingStrategy.NO_SHARD,  # plain data parallel
}
CHECKPOINTING = {"non_reentrant": CheckpointImpl.NO_REENTRANT, "reentrant": CheckpointImpl.REENTRANT, "none": None}


class CausalLMWithLoss(nn.Module):
    """The model and its loss in one forward, so that FSDP's root unit spans lm_head and the loss.

    The loss never materialises the logits of the whole batch: at batch 8 x 2048 tokens a 128k vocabulary means 4 GiB of
    bf16 logits, 8 GiB more in fp32 for the softmax, and as much again for their gradient. Instead lm_head and the
    fp32 cross-entropy run over chunks of tokens, each recomputed in backward (checkpointed), costing one extra lm_head
    matmul. Called without labels it is the plain transformers model (logits), for sampling.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 4096, compile: str | None = None):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens
        self.softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3 cap their logits
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
        return self.logits_loss(F.linear(hidden, weight), labels, self.softcap)


def _logits_loss(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The summed cross-entropy of bf16 logits, in fp32; labels of -100 (prompt, padding) are ignored."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


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


def compile_elementwise(model: nn.Module, layer_cls: type[nn.Module], backend: str = "inductor") -> None:
    """Fuse the memory-bound work between the matmuls of every decoder layer with torch.compile, in place.

    Eagerly, each elementwise op reads and writes whole activations: transformers' RMSNorm makes six passes (upcast,
    square, mean, scale, downcast, weight), and at 8 x 2048 tokens a gate_proj output is 450 MB. Compiled, each piece
    below is one kernel; on one H100 this took an 8B model from 8,100 to 10,200 tokens/s (BENCHMARKS.md). The
    matmuls stay eager, so bitsandbytes' kernels and FSDP's parameter views are never traced. The pieces:
      - RMSNorms (Llama-style and Gemma-style, including Qwen3's q/k norms);
      - gated MLPs (gate_proj, up_proj, down_proj, act_fn: Llama, Mistral, Qwen, Gemma): act_fn(gate) * up;
      - the rotary embedding: the modeling module's own apply_rotary_pos_emb. It is a module-level function, so the
        replacement is process-wide: every model of the architecture in the process, transformers' own generate
        included, then uses it. On a GPU it rounds to bf16 once instead of after each op (BENCHMARKS.md, tests).
    The compiled functions take tensors only: compiling the modules themselves fused less on the GPU (the multiply
    after the activation and most of the norm stayed eager, 9,300 tokens/s). A module is replaced only after it
    computed exactly what the replacement computes on a random input; any other module stays as it is.
    backend="aot_eager" traces the same graphs without generating kernels (the CPU tests).
    """
    norm_fn, fused = torch.compile(_rms_norm, backend=backend), {}
    modeling = sys.modules[type(model).__module__]
    rotary = getattr(modeling, "apply_rotary_pos_emb", None)
    if callable(rotary) and not hasattr(rotary, "_torchdynamo_orig_callable"):
        modeling.apply_rotary_pos_emb = torch.compile(rotary, backend=backend)
    for layer in (m for m in model.modules() if isinstance(m, layer_cls)):
        for module in layer.modules():
            if "RMSNorm" in type(module).__name__ and (variant := _norm_variant(module)):
                module.forward = functools.partial(_fused_norm, module, norm_fn, *variant)
            elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                if (fn := _activation_variant(module.act_fn)) is not None:
                    fused.setdefault(fn, torch.compile(fn, backend=backend))
                    module.forward = functools.partial(_fused_mlp, module, fused[fn])


class LayerAdapters(nn.Module):
    """A decoder layer, and beside it the LoRA weights of all its adapted linears: FSDP makes one unit of each.

    FSDP1 flattens a unit's parameters into one tensor of one dtype and one requires_grad, so LoRA's trainable fp32
    weights cannot share the unit of the layer's frozen bf16 (and bf16-packed 4-bit) weights. Wrapping each A and B
    alone made 14 units per layer, whose hooks (run again when a checkpointed layer is recomputed) cost more than the
    GPU work at small batches (BENCHMARKS.md). Here A and B leave the layer's module tree for `adapters` (each
    LoRALinear keeps a plain reference and computes as before), so this wrapper's unit holds exactly the layer's LoRA
    weights and the inner unit exactly its frozen ones. The wrapper's forward is the layer's: FSDP gathers the LoRA
    weights before the layer runs, and in backward before it is recomputed.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._adapters_wrapped_module = layer  # lora.clean_name drops this attribute from paths
        self.adapters = nn.ModuleDict()
        for name, module in layer.named_modules():
            if isinstance(module, LoRALinear):
                for ab in ("lora_A", "lora_B"):
                    factor = module._modules.pop(ab)
                    object.__setattr__(module, ab, factor)  # module.lora_A still works; it is no longer a child
                    self.adapters[f"{name}.{ab}".replace(".", "-")] = factor

    def forward(self, *args, **kwargs):
        return self._adapters_wrapped_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model's loop reads off its layers (Qwen, Gemma: attention_type)
            return getattr(self._modules["_adapters_wrapped_module"], name)


def natural_lora_names(model: nn.Module) -> dict[str, str]:
    """Each LoRA weight's parameter name under the wrapped model -> the name it has with A and B inside their
    LoRALinear ("...layers.0.adapters.mlp-up_proj-lora_A.weight" -> "...layers.0.mlp.up_proj.lora_A.weight"), the
    same layout as the adapter file. Checkpoints key the optimizer state by these, whatever the FSDP grouping."""
    names = {}
    for path, module in model.named_modules():
        if isinstance(module, LayerAdapters):
            for key in module.adapters:
                natural = key.replace("-", ".")  # the inverse of the key LayerAdapters made
                names[clean_name(f"{path}.adapters.{key}.weight")] = clean_name(f"{path}.{natural}.weight")
    return names


def group_adapters(model: nn.Module, layer_cls: type[nn.Module]) -> None:
    """Put every decoder layer that holds LoRA inside a LayerAdapters, in place."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_cls)]
    for name, layer in layers:
        if any(isinstance(m, LoRALinear) for m in layer.modules()):
            model.set_submodule(name, LayerAdapters(layer))


def wrap_model(model: nn.Module, layer_cls: type[nn.Module], device: torch.device, sharding: str = "full_shard",
               cpu_offload: bool = False, grad_checkpointing: str = "non_reentrant", compile: str | None = None) -> FSDP:
    """compile: None, or the torch.compile backend for compile_elementwise and the loss ("inductor" on GPUs)."""
    if compile:
        compile_elementwise(model, layer_cls, compile)
    if grad_checkpointing == "reentrant":
        # Reentrant checkpointing only backpropagates into a segment whose inputs require grad; the frozen embedding's
        # output does not, so the LoRA weights of the first layer would silently get no gradient without this hook.
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    group_adapters(model, layer_cls)
    model = CausalLMWithLoss(model, compile=compile)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_cls, LayerAdapters})
    model = FSDP(
        model,
        auto_wrap_policy=policy,
        sharding_strategy=SHARDING[sharding],
        # param_dtype must equal the 4-bit layers' quant_storage (bf16): FSDP casts every flat parameter to it, and a
        # packed 4-bit weight survives the cast only when it is a no-op. LoRA's fp32 masters are cast to bf16 for
        # compute. Gradients are reduced in fp32 so that summing over ranks loses nothing. Buffers are left alone,
        # which keeps the rotary inv_freq in fp32.
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        cpu_offload=CPUOffload(offload_params=True) if cpu_offload else None,
        # Every rank built the identical model from the same files, so nothing is broadcast (and on CPU it cannot be).
        sync_module_states=False,
        # The device each unit is moved to as it is wrapped, and where its shard lives; CPU for gloo runs.
        device_id=device,
        # Rate-limits all-gathers so that at most two units are unsharded at a time: bounded memory, small cost.
        limit_all_gathers=True,
        use_orig_params=False,
    )
    if CHECKPOINTING[grad_checkpointing] is not None:
        # Recompute each decoder layer in backward instead of storing its activations: memory O(layers) -> O(1).
        # Non-reentrant needs no input that requires grad (all embeddings here are frozen) and supports kwargs.
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CHECKPOINTING[grad_checkpointing])
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, layer_cls))
    return model


def gather_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full LoRA weights on every rank, keyed "<path>.lora_A.weight": a collective, so every rank must call it.

    One layer's LoRA unit at a time, without its inner unit (recurse=False): a 4-bit layer is never unsharded. (A full
    state dict of the root would gather the whole base model; on CPU its offload_to_cpu path also crashes.)
    """
    hf_model = next(m for m in model.modules() if isinstance(m, PreTrainedModel))  # names as PEFT sees them
    names = {id(m): name for name, m in lora_modules(hf_model).items()}
    state = {}
    for unit in FSDP.fsdp_modules(model):
        if not isinstance(unit.module, LayerAdapters):
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for module in (m for m in unit.module.modules() if isinstance(m, LoRALinear)):
                for ab in ("lora_A", "lora_B"):
                    state[f"{names[id(module)]}.{ab}.weight"] = getattr(module, ab).weight.detach().to("cpu", copy=True)
    return state
