"""Shard the model with FSDP1 and checkpoint its decoder layers: the one place that knows about either.

Order matters and is fixed: wrap first (each decoder layer and each LoRA leaf becomes an FSDP unit, and the root spans
the embeddings, lm_head and the loss), then put activation checkpointing inside each decoder-layer unit, as torchtitan
and the FSDP-QLoRA recipe do.
"""
import functools

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
from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from lora import lora_modules

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

    def __init__(self, model: nn.Module, chunk_tokens: int = 4096):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens
        self.softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3 cap their logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs):
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        hidden, labels = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # token t predicts token t+1
        weight = self.model.get_output_embeddings().weight
        return sum(checkpoint(self._chunk_loss, hidden[i:i + self.chunk_tokens], weight,
                              labels[i:i + self.chunk_tokens], use_reentrant=False)
                   for i in range(0, len(labels), self.chunk_tokens))

    def _chunk_loss(self, hidden, weight, labels):
        logits = F.linear(hidden, weight).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, labels, reduction="sum")  # labels of -100 (prompt, padding) are ignored


def _is_trainable_leaf(module: nn.Module) -> bool:
    # LoRA's A and B: fp32 and trainable. A flat parameter must have one dtype and one requires_grad, so they cannot
    # share a unit with the frozen bf16 (and bf16-packed 4-bit) weights of their decoder layer.
    weight = getattr(module, "weight", None)
    return next(module.children(), None) is None and weight is not None and weight.requires_grad


def wrap_model(model: nn.Module, layer_cls: type[nn.Module], device: torch.device, sharding: str = "full_shard",
               cpu_offload: bool = False, grad_checkpointing: str = "non_reentrant") -> FSDP:
    if grad_checkpointing == "reentrant":
        # Reentrant checkpointing only backpropagates into a segment whose inputs require grad; the frozen embedding's
        # output does not, so the LoRA weights of the first layer would silently get no gradient without this hook.
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    model = CausalLMWithLoss(model)
    policy = functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_trainable_leaf),
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_cls}),
    ])
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

    Each LoRA leaf is its own FSDP unit, so gathering them one by one never unshards a 4-bit layer. (A full state dict
    of the root would gather the whole base model; on CPU its offload_to_cpu path also crashes.)
    """
    hf_model = next(m for m in model.modules() if isinstance(m, PreTrainedModel))  # names as PEFT sees them
    state = {}
    for name, module in lora_modules(hf_model).items():
        for ab in ("lora_A", "lora_B"):
            unit = getattr(module, ab)
            with FSDP.summon_full_params(unit, writeback=False):
                state[f"{name}.{ab}.weight"] = unit.weight.detach().to("cpu", copy=True)
    return state
