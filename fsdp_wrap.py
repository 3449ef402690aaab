"""Shard the model with FSDP1 and checkpoint its decoder layers: the one place that knows about either.

Order matters and is fixed (wrap_model): compile the elementwise work of the decoder layers (CUDA; fused.py), tile
their MLPs if asked (fused.py), group each layer's LoRA weights, add the chunked loss (fused.py), wrap (per decoder
layer two FSDP units, one for its frozen weights and one around it for its LoRA weights; the root spans the
embeddings, lm_head and the loss), then put activation checkpointing inside each decoder-layer unit, as torchtitan
and the FSDP-QLoRA recipe do, its saved layer inputs in host memory if asked (offload.py). What to do at each step is
one typed value, Wrapping.

--cpu_offload on several GPUs is FSDP's CPUOffload: each rank's shards live in host memory, and the optimizer steps
there. On one GPU FSDP does not shard (it switches to NO_SHARD), and its CPUOffload then leaves every unit's copy on the
GPU after use, so the whole model ends up there. One GPU therefore streams instead (offload.WeightStream): the decoder
layers' frozen weights stay out of FSDP, in pinned host memory, and come to the GPU one layer ahead of their use; the
LoRA weights, their optimizer state, the embeddings and the head stay on the GPU.
"""
import functools
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import PreTrainedModel

import fused
import offload
import quantization
import settings
from lora import Adapter, adapter_weights, lora_modules

# full_shard: params, grads and optimizer state split over all ranks (ZeRO-3); shard_grad_op: params kept whole
# between forward and backward (ZeRO-2); hybrid_shard: full_shard inside a node, replicated across nodes; no_shard:
# plain data parallel
SHARDING = {name: ShardingStrategy[name.upper()] for name in settings.SHARDING}
CHECKPOINTING = dict(zip(settings.CHECKPOINTING, (CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT, None),
                         strict=True))


def clean_name(name: str) -> str:
    """A module path without the wrappers' own attributes: FSDP, activation checkpointing, torch.compile, and
    LayerAdapters; what the path is in the unwrapped model, and in the adapter file."""
    return re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|_adapters_wrapped_module)\.", "", name)


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
        self._adapters_wrapped_module = layer  # clean_name drops this attribute from paths
        self.adapters = nn.ModuleDict()
        for name, module in layer.named_modules():
            if isinstance(module, Adapter):  # an MoE layer's ExpertsLoRA too: its weights join the same unit
                for part in module.adapter_params():
                    weights = module._modules.pop(part)
                    object.__setattr__(module, part, weights)  # module.lora_A still works; it is no longer a child
                    self.adapters[f"{name}.{part}".replace(".", "-")] = weights

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
        if any(isinstance(m, Adapter) for m in layer.modules()):
            model.set_submodule(name, LayerAdapters(layer))


@dataclass(frozen=True)
class Wrapping:
    """How wrap_model shards, recomputes, compiles and offloads: a run's settings (train.py builds it from its flags).
    The defaults are the plainest wrapping: everything sharded, every decoder layer recomputed, nothing else."""
    sharding: str = "full_shard"  # a key of SHARDING; one rank has nothing to shard and gets no_shard
    cpu_offload: bool = False  # parameters in host memory: FSDP's CPUOffload on several ranks, WeightStream on one
    grad_checkpointing: str = "non_reentrant"  # a key of CHECKPOINTING
    compile: str | None = None  # the torch.compile backend of fused.compile_elementwise and the loss; None: eager
    offload_activations: bool = False  # checkpointed layer inputs in host memory (needs non-reentrant checkpointing)
    tiled_mlp: int = 0  # tokens per MLP tile (fused.tile_mlps); 0 leaves the MLPs whole


def wrap_model(model: nn.Module, layer_cls: type[nn.Module], device: torch.device, *,
               wrapping: Wrapping = Wrapping()) -> FSDP:
    """The model, made ready to train on `device`: its decoder layers (`layer_cls`) compiled, tiled, grouped with
    their LoRA weights, sharded and checkpointed as `wrapping` says, in this fixed order."""
    # 1. Compile the elementwise work between the matmuls (before FSDP: it replaces forwards of the layers' modules)
    if wrapping.compile:
        fused.compile_elementwise(model, layer_cls, wrapping.compile)
    # 2. Tile the MLPs (over whatever forward step 1 left them)
    if wrapping.tiled_mlp:
        fused.tile_mlps(model, layer_cls, wrapping.tiled_mlp)
    # 3. Reentrant checkpointing only backpropagates into a segment whose inputs require grad; the frozen embedding's
    # output does not, so the LoRA weights of the first layer would silently get no gradient without this hook.
    if wrapping.grad_checkpointing == "reentrant":
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    # 4. Each decoder layer's LoRA weights beside it, for a unit of their own (LayerAdapters)
    group_adapters(model, layer_cls)
    # 5. The chunked loss inside the root, so that FSDP's root unit spans lm_head and the loss
    model = fused.CausalLMWithLoss(model, compile=wrapping.compile)
    # 6. --cpu_offload on one rank: the decoder layers' frozen weights stream from host memory, outside FSDP
    one_rank = torch.distributed.get_world_size() == 1
    stream, streamed, offload_params = None, None, wrapping.cpu_offload
    if wrapping.cpu_offload and one_rank:
        if CHECKPOINTING[wrapping.grad_checkpointing] is None:
            raise ValueError(offload.NEEDS_RECOMPUTE)
        streamed = [m for m in model.modules() if isinstance(m, layer_cls)]  # in the order forward runs them
        stream = offload.WeightStream(streamed, device, quantization.state_tensors)
        offload_params = False  # FSDP leaves these layers alone (ignored_states) and keeps the rest on the GPU
    # 7. Shard: per decoder layer one unit of its frozen weights inside one of its LoRA weights; the root the rest
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_cls, LayerAdapters})
    model = FSDP(
        model,
        auto_wrap_policy=policy,
        # One rank has nothing to shard: FSDP switches to NO_SHARD itself then, with a warning at every launch
        sharding_strategy=SHARDING["no_shard" if one_rank else wrapping.sharding],
        # param_dtype must equal the 4-bit layers' quant_storage (bf16): FSDP casts every flat parameter to it, and a
        # packed 4-bit weight survives the cast only when it is a no-op. LoRA's fp32 masters are cast to bf16 for
        # compute. Gradients are reduced in fp32 so that summing over ranks loses nothing. Buffers are left alone,
        # which keeps the rotary inv_freq in fp32.
        mixed_precision=MixedPrecision(param_dtype=quantization.STORAGE, reduce_dtype=torch.float32),
        cpu_offload=CPUOffload(offload_params=True) if offload_params else None,
        # Every rank built the identical model from the same files, so nothing is broadcast (and on CPU it cannot be).
        sync_module_states=False,
        # The device each unit is moved to as it is wrapped, and where its shard lives; CPU for gloo runs.
        device_id=device,
        # Rate-limits all-gathers so that at most two units are unsharded at a time: bounded memory, small cost.
        limit_all_gathers=True,
        use_orig_params=False,
        ignored_states=streamed,
    )
    model.weight_stream = stream  # None unless streaming: the log and the tests read it
    # 8. Recompute each decoder layer in backward instead of storing its activations: memory O(layers) -> O(1).
    # Non-reentrant needs no input that requires grad (all embeddings here are frozen) and supports kwargs.
    if (impl := CHECKPOINTING[wrapping.grad_checkpointing]) is not None:
        offloaded = offload.ActivationOffload(device).checkpoint if wrapping.offload_activations else None
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=impl, checkpoint_fn=offloaded)
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper,
                                       check_fn=lambda m: isinstance(m, layer_cls))
    return model


def gather_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full LoRA weights on every rank, keyed "<path>.lora_A.weight": a collective, so every rank must call it.

    One layer's LoRA unit at a time, without its inner unit (recurse=False): a 4-bit layer is never unsharded. (A full
    state dict of the root would gather the whole base model; on CPU its offload_to_cpu path also crashes.)
    """
    hf_model = next(m for m in model.modules() if isinstance(m, PreTrainedModel))  # names as PEFT sees them
    names = {id(m): clean_name(name) for name, m in lora_modules(hf_model).items()}
    state = {}
    for unit in FSDP.fsdp_modules(model):
        if not isinstance(unit.module, LayerAdapters):
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            modules = {names[id(m)]: m for m in unit.module.modules() if isinstance(m, Adapter)}
            state.update({k: w.detach().to("cpu", copy=True) for k, w in adapter_weights(modules).items()})
    return state
