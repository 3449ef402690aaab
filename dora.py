"""DoRA: LoRA with the weight's length per output feature learned apart from its direction (--use_dora).

    W' = m * (W + s B A) / ||W + s B A||      (Liu et al. 2024, "DoRA", https://arxiv.org/abs/2402.09353)

The norm is taken per output feature (over each row of the (out, in) weight), and m, the magnitude, is one trainable
number per output feature, starting at ||W||: at step 0 the layer computes what the base computes (under FSDP's
bf16 mixed precision, m computes in bf16 as A and B do: up to its rounding). As in the paper
and in PEFT, the norm is a constant in backward (detached): its gradient would cost another pass over the weight and
the paper found it changes little. With W a 4-bit weight, W is its dequantized matrix, as everywhere in training.

A variant of LoRALinear in everything else (the same A and B, the same paths): it adds the magnitude to the weights
its adapter_params names, so FSDP's LoRA unit, the checkpoints, the optimizer and the adapter file (PEFT's
`lora_magnitude_vector`, use_dora in adapter_config.json) take it with no change of their own. PEFT's ParamWrapper has
no DoRA, and neither do MoE experts here. vLLM does not serve DoRA adapters: merge.py makes a checkpoint it serves.
"""
import copy

import torch
import torch.nn as nn

import lora
import quantization

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name for m, in the module and (without ".weight") in the adapter file


class Magnitude(nn.Module):
    """m, an fp32 master weight of shape (out,), in a module of its own so that it is a `.weight` as A and B are."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm.float())


class DoRALinear(lora.LoRALinear):
    """y = (m / ||W + s B A||) * (x (W + s B A)^T) + bias, the norm per output feature and constant in backward.

    Merged (training without dropout, and inference on many rows): one GEMM with W + s B A (lora._MergedLoRA), then
    each output feature scaled by m / norm. The norm comes from that same merged matrix, built once more without
    gradients. Unmerged, PEFT's form: base(x) + (k - 1) (base(x) - bias) + k s B(A(x)) with k = m / norm, and with
    dropout, x W^T of the dropped-out x in place of base(x) - bias, as PEFT computes it there.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, device: torch.device | str = "cpu"):
        super().__init__(base, r, alpha, dropout, device)
        # m = ||W|| (B is zero), computed where LoRA lives: a base waiting in host memory (several GPUs, offload) is
        # copied there for it, one layer at a time, as PEFT copies a 4-bit layer to dequantize it
        here = base if base.weight.device == torch.device(device) else copy.deepcopy(base).to(device)
        setattr(self, MAGNITUDE, Magnitude(weight_norm(here, self.lora_A.weight, self.lora_B.weight, self.scaling)))

    def adapter_params(self) -> tuple[str, ...]:
        return super().adapter_params() + (MAGNITUDE,)

    def scale(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """k = m / ||W + s B A|| (out,), in fp32: m's gradient flows through it, the norm's does not."""
        return getattr(self, MAGNITUDE).weight.float() / weight_norm(self.base, a, b, self.scaling)

    def merged(self, rows: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.weight.to(rows.dtype), self.lora_B.weight.to(rows.dtype)  # no-ops under FSDP
        out = lora._MergedLoRA.apply(rows, self.base.weight, a, b, None, self.base, self.scaling) * self.scale(a, b)
        out = out.to(rows.dtype)
        return out if self.base.bias is None else out + self.base.bias.to(rows.dtype)

    def unmerged(self, rows: torch.Tensor) -> torch.Tensor:
        out = self.base(rows)
        dropped = self.dropout(rows)
        k = self.scale(self.lora_A.weight, self.lora_B.weight).to(out.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            plain = out if self.base.bias is None else out - self.base.bias.to(out.dtype)
        else:  # x W^T of the dropped-out x: the direction's update sees what LoRA's does
            plain = nn.functional.linear(dropped, lora.dense_weight(self.base, self.base.weight).to(out.dtype))
        update = self.lora_B(self.lora_A(dropped) * self.scaling).to(out.dtype)
        return out + (k - 1) * plain + k * update


def weight_norm(base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per output feature (out,), in fp32, without gradients, from the matrix the merged forward
    multiplies by (its dtype: bf16 from 4 bits)."""
    with torch.no_grad():
        dtype = quantization.COMPUTE if quantization.is_4bit(base) else base.weight.dtype
        merged = lora.merged_weight(base, base.weight, a.to(dtype), b.to(dtype), scaling)
        return torch.linalg.vector_norm(merged, dim=1, dtype=torch.float32)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """m / ||W + s B A|| * (W + s B A) by output feature, in the dtype of the inputs (merge.py: fp32): the weight a
    DoRA adapter leaves, which any stack serves as a plain linear's."""
    merged = lora.add_update(weight, a, b, scaling)
    return merged * (magnitude / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1)
