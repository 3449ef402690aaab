"""The 4-bit base: bitsandbytes' NF4/FP4 layers, quantized and dequantized one way. The only module that imports it.

A 4-bit weight is a Params4bit holding packed bytes (two 4-bit codes per byte) viewed as STORAGE, plus a quant_state
(per-block scales, themselves 8-bit with double quantization). It lives in a Linear4bit, whose forward dequantizes
block by block inside bitsandbytes' kernels.
"""
import bitsandbytes as bnb
import torch
import torch.nn as nn
from bitsandbytes.functional import dequantize_4bit

QUANT_TYPES = ("nf4", "fp4", "none")  # none: the base stays bf16 (plain LoRA)
DEFAULT = "nf4"  # the QLoRA paper's choice: quantiles of a normal distribution, which weights roughly follow
# The dtype the packed bytes are viewed as. FSDP flattens every parameter of a unit into one tensor of one dtype and
# casts it to MixedPrecision's param_dtype: the packed bytes survive only a no-op cast, so STORAGE must be that
# param_dtype (fsdp_wrap.py), and bf16 also lets them share a flat parameter with the layer's bf16 norms.
STORAGE = torch.bfloat16
COMPUTE = torch.bfloat16  # the dtype the weight is dequantized to for each matmul


def linear4bit_shell(linear: nn.Linear, quant: str) -> nn.Module:
    """An empty (meta) Linear4bit with `linear`'s shape, for the loader to fill with quantize()."""
    shell = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=COMPUTE,
        compress_statistics=True,  # double quantization: the absmax scales are themselves 8-bit, ~0.4 bit/param saved
        quant_type=quant, quant_storage=STORAGE, device="meta",
    )
    # CPU trap: with avx512_bf16, an eval-mode no-grad forward repacks the weight in place and training afterwards
    # silently loses gradients. Keeping the portable CPU path costs nothing on GPU.
    shell.support_avx512bf16_for_cpu = False
    return shell


def is_4bit(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def quantize(weight: torch.Tensor, quant: str, device: torch.device, module: nn.Module | None = None):
    """A bf16 weight as a packed 4-bit Params4bit on `device`, as linear4bit_shell declares it: the one quantization
    that the loader and merge.py both use.

    `module=` makes bitsandbytes also keep quant_state on the Linear4bit: FSDP flattens the weight and drops the
    attribute from it, and Linear4bit.forward restores it from the module.
    """
    return bnb.nn.Params4bit(weight.to(COMPUTE), requires_grad=False, quant_type=quant, compress_statistics=True,
                             quant_storage=STORAGE, module=module)._quantize(device)


def dequantize(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """The dense (out, in) COMPUTE matrix a 4-bit weight stands for.

    Under FSDP the weight arrives as a plain view of its flat parameter, without the quant_state bitsandbytes hangs
    on it; the Linear4bit module keeps a copy (quantize's `module=`).
    """
    quant_state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    return dequantize_4bit(weight.reshape(-1, 1), quant_state)
