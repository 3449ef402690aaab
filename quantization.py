"""The 4-bit base: bitsandbytes' NF4/FP4 layers, quantized and dequantized one way, and the format bitsandbytes stores
them in. The only module that imports it: another 4-bit library would replace this module.

A 4-bit weight is a Params4bit holding packed bytes (two 4-bit codes per byte) viewed as STORAGE, plus a quant_state
(per-block scales, themselves 8-bit with double quantization). It lives in a Linear4bit, whose forward dequantizes
block by block inside bitsandbytes' kernels.

A pre-quantized model folder (transformers' save_pretrained of a bitsandbytes 4-bit model) says so in config.json's
quantization_config (stored_quant; stored_config writes it), and stores each 4-bit weight as its packed bytes under
the weight's own name, beside the quant_state's tensors under `<weight>.<stat>`: `absmax`, `quant_map`, with double
quantization `nested_absmax` and `nested_quant_map`, and `quant_state.bitsandbytes__<type>`, a JSON of the rest (shape,
dtype, block sizes, offset). prequantized_weights finds them among a folder's tensor names, holds_packed checks the
bytes' size, and from_prequantized and serialize turn one into the other.
"""
import logging
import math
import types
from collections.abc import Iterable

import torch
import torch.nn as nn

from settings import AUTO, QUANT_TYPES
from settings import DEFAULT_QUANT as DEFAULT

# On a CPU with AVX512-BF16 and without the optional `kernels` package, importing bitsandbytes logs that it "Failed
# to load CPU gemm_4bit_forward ... pip install kernels", once per process. That kernel serves only the repacked CPU
# layout, which every 4-bit layer here turns off (linear4bit_shell), so nothing is missing: the message is dropped,
# and every other of bitsandbytes' messages kept.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"))

import bitsandbytes as bnb  # noqa: E402
from bitsandbytes.functional import QuantState, dequantize_4bit  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

# The dtype the packed bytes are viewed as. FSDP flattens every parameter of a unit into one tensor of one dtype and
# casts it to MixedPrecision's param_dtype: the packed bytes survive only a no-op cast, so STORAGE must be that
# param_dtype (fsdp_wrap.py), and bf16 also lets them share a flat parameter with the layer's bf16 norms.
STORAGE = torch.bfloat16
COMPUTE = torch.bfloat16  # the dtype the weight is dequantized to for each matmul


def linear4bit_shell(linear: nn.Linear, quant: str) -> nn.Module:
    """An empty (meta) Linear4bit with `linear`'s shape, for the loader to fill with quantize() or from_prequantized()
    (whose weight then follows the checkpoint's own quant_state, double quantization or not)."""
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


class Packed4bit(nn.Module):
    """One 4-bit weight of any shape outside a linear layer (an MoE layer's experts, (experts, out, in)): the packed
    bytes are its parameter `weight`, in STORAGE like a Linear4bit's, so FSDP flattens them with the layer's other
    frozen weights; the quant_state stays on the module, as FSDP drops it from the flattened weight. Calling it gives
    the dense COMPUTE tensor."""

    def __init__(self, shape: tuple[int, ...], quant: str):
        super().__init__()
        self.shape, self.quant_type, self.quant_state = tuple(shape), quant, None
        packed = torch.empty(math.ceil(packed_bytes(shape) / STORAGE.itemsize), 1, dtype=STORAGE, device="meta")
        self.weight = nn.Parameter(packed, requires_grad=False)  # replaced by quantize(..., module=self)

    def forward(self) -> torch.Tensor:
        return dequantize(self.weight, self)


def pack_experts(experts: nn.Module, quant: str) -> list[str]:
    """Swap the 3-D parameters of a transformers experts module (on meta) for Packed4bit shells in `experts.packed`,
    and give this module (no other, not its class) a forward that runs the class's own on their dense tensors.
    Returns the names swapped."""
    names = [name for name, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    if names:
        experts.packed = nn.ModuleDict({name: Packed4bit(experts._parameters.pop(name).shape, quant)
                                        for name in names})
        experts.forward = types.MethodType(_forward_dequantized, experts)
    return names


def _forward_dequantized(experts: nn.Module, *args, **kwargs):
    return forward_with(experts, {name: packed() for name, packed in experts.packed.items()}, *args, **kwargs)


def forward_with(experts: nn.Module, weights: dict[str, torch.Tensor], *args, **kwargs):
    """The experts class's own forward (eager, or grouped_mm as config._experts_implementation picks) run on
    `weights` (name -> dense 3-D tensor) instead of the module's own: dequantized ones here, with LoRA's update added
    in lora.py. For this call they are plain instance attributes, which Python finds before nn.Module's parameters
    and before the class's; afterwards only the module's own (packed or 16-bit) stay. Autograd keeps the dense
    tensors until the backward of the layer, unless activation checkpointing recomputes it (then they live for one
    layer at a time)."""
    for name, weight in weights.items():
        object.__setattr__(experts, name, weight)
    try:
        return type(experts).forward(experts, *args, **kwargs)
    finally:
        for name in weights:
            object.__delattr__(experts, name)


def packed_shells(model: nn.Module) -> dict[str, Packed4bit]:
    """The Packed4bit modules of `model` by the name of the tensor they hold (dense_name)."""
    return {dense_name(name): m for name, m in model.named_modules() if isinstance(m, Packed4bit)}


def dense_name(shell_name: str) -> str:
    """"...experts.packed.down_proj" (a Packed4bit) holds "...experts.down_proj": the model's and the fused
    checkpoint's name for it."""
    experts, _, attr = shell_name.rpartition(".")
    return f"{experts.removesuffix('.packed')}.{attr}"


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


def state_tensors(module: nn.Module):
    """(owner, attribute, tensor) for every tensor of the quant_state a 4-bit module holds, the nested statistics'
    included: what has to travel with the packed bytes when they move (offload.WeightStream). Nothing for other
    modules."""
    seen = set()

    def walk(state):
        if not isinstance(state, QuantState) or id(state) in seen:
            return
        seen.add(id(state))
        for key, value in vars(state).items():
            if isinstance(value, torch.Tensor):
                yield state, key, value
            else:
                yield from walk(value)  # state2: the absmax scales' own quant_state

    yield from walk(getattr(module, "quant_state", None))
    yield from walk(getattr(module._parameters.get("weight"), "quant_state", None))  # the same object, as a rule


# ----------------------------------------------------------------------------------------------------------------------
# The stored format

# The quant_state's entries in a model folder, after "<weight>.": every 4-bit weight has the first two and one
# STATE_KEY + its type; double quantization adds NESTED. (bitsandbytes' own names: QuantState.as_dict(packed=True).)
STATS = ("absmax", "quant_map")
NESTED = ("nested_absmax", "nested_quant_map")
STATE_KEY = "quant_state.bitsandbytes__"


def stored_quant(quantization_config: dict | BitsAndBytesConfig | None) -> str | None:
    """The 4-bit type ("nf4" or "fp4") config.json's quantization_config (a dict, or transformers' config object)
    says the weights are stored in; None for 16-bit weights (no quantization_config). ValueError, with the reason,
    for any other quantization (GPTQ, AWQ, bitsandbytes 8-bit, ...).

    Which linears are 4-bit, their block size and double quantization are read from the weights' own quant_state
    entries, as transformers does; bnb_4bit_compute_dtype is a runtime choice, not a property of the bytes, and ours
    is COMPUTE."""
    if quantization_config is None:
        return None
    qc = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    method = getattr(qc.get("quant_method"), "value", qc.get("quant_method"))  # an enum in a BitsAndBytesConfig
    if method != "bitsandbytes":
        raise ValueError(f"the weights are quantized with {method} (quantization_config.quant_method), which this "
                         "loader cannot read: it takes 16-bit and bitsandbytes 4-bit checkpoints")
    if qc.get("load_in_8bit") or not qc.get("load_in_4bit"):
        raise ValueError("the weights are bitsandbytes 8-bit (quantization_config.load_in_8bit), which this loader "
                         "cannot read: it takes 16-bit and bitsandbytes 4-bit checkpoints")
    if qc.get("bnb_4bit_quant_type") not in ("nf4", "fp4"):
        raise ValueError(f"quantization_config.bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type')!r}; "
                         "bitsandbytes writes 'nf4' or 'fp4'")
    return qc["bnb_4bit_quant_type"]


def stored_config(quant: str, skip: list[str]) -> BitsAndBytesConfig:
    """config.json's quantization_config for weights quantize()d to `quant`, as transformers records a bitsandbytes
    4-bit model, so that its from_pretrained loads them as 4-bit too. `skip`: the linears left in 16 bits."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=COMPUTE, bnb_4bit_quant_storage=STORAGE,
                              llm_int8_skip_modules=skip)


def prequantized_weights(names: Iterable[str], quant: str | None) -> dict[str, list[str]]:
    """The 4-bit weights among the tensor names of a model folder pre-quantized to `quant` (None: 16-bit weights,
    none of them 4-bit): each weight's name -> the names of its entries, the packed bytes first, then its
    quant_state's. A weight is 4-bit when the folder has quant_state entries for it; ValueError naming one it lacks."""
    if quant is None:
        return {}
    state = STATE_KEY + quant
    found: dict[str, set[str]] = {}
    for name in names:
        for suffix in (*STATS, *NESTED, state):
            if name.endswith("." + suffix):
                found.setdefault(name[: -len(suffix) - 1], set()).add(suffix)
    packed = {}
    for weight, have in sorted(found.items()):
        need = [*STATS, state] + (list(NESTED) if have & set(NESTED) else [])
        lost = [suffix for suffix in need if suffix not in have]
        if lost:
            raise ValueError(f"{weight}.{lost[0]} is missing from the checkpoint, which has the other quant_state "
                             f"entries of the 4-bit weight {weight}")
        packed[weight] = [weight] + [f"{weight}.{suffix}" for suffix in need]
    return packed


def packed_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of packed codes for a weight of `shape`: two 4-bit codes a byte, whatever dtype they are viewed as."""
    return (math.prod(shape) + 1) // 2


def quantized_bytes(shape: tuple[int, ...]) -> int:
    """Bytes a weight of `shape` takes once quantize()d: the packed codes plus double-quantized statistics (one byte
    of absmax per block of 64 weights, one fp32 per 256 of those, and the two code books)."""
    blocks = math.ceil(math.prod(shape) / 64)
    return packed_bytes(shape) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256)


def holds_packed(stored_shape: tuple[int, ...], nbytes: int, shape: tuple[int, ...]) -> bool:
    """Whether a stored tensor (its shape, its size in bytes) holds the packed codes of a weight of `shape`: a column
    (n, 1) of packed_bytes(shape) bytes, viewed as uint8 (transformers' default quant_storage) or any other dtype."""
    return tuple(stored_shape[1:]) == (1,) and nbytes == packed_bytes(shape)


def from_prequantized(name: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...], device: torch.device,
                      module: nn.Module | None = None):
    """The 4-bit weight `name` from its stored entries (`stored`: each by its name in the model folder, the packed
    bytes under `name` itself) as the Params4bit quantize() would have made, the bytes reused as they are: no
    dequantize/requantize round trip.

    Model folders store the bytes as uint8 (transformers' default quant_storage) or viewed as another dtype; they are
    viewed as STORAGE here, the dtype FSDP needs. The quant_state says which 4-bit type, block size and double
    quantization the bytes use. ValueError, with the reason, when the entries do not describe a weight of `shape`.
    """
    raw = stored[name].reshape(-1).view(torch.uint8)
    stats = {key.removeprefix(f"{name}."): tensor for key, tensor in stored.items() if key != name}
    if raw.numel() % STORAGE.itemsize:
        raise ValueError(f"its {raw.numel()} packed bytes cannot be viewed as {STORAGE}")
    try:
        weight = bnb.nn.Params4bit.from_prequantized(raw.view(STORAGE).reshape(-1, 1), stats,
                                                     requires_grad=False, device=device, module=module)
    # bitsandbytes asserts on unknown keys, and looks the JSON's "dtype" up as an attribute of torch
    except (ValueError, KeyError, TypeError, AssertionError, AttributeError) as e:
        raise ValueError(f"its quant_state entries cannot be read ({type(e).__name__}: {e})") from e
    state = weight.quant_state
    if tuple(state.shape) != tuple(shape) or state.absmax.numel() != math.ceil(math.prod(shape) / state.blocksize):
        raise ValueError(f"its quant_state describes a {list(state.shape)} weight with {state.absmax.numel()} blocks "
                         f"of {state.blocksize}, not the config's {list(shape)}")
    # The dtype dequantization writes: weights quantized from fp16 say float16, and an fp16 matrix would then meet
    # bf16 activations and LoRA factors. bf16 it is, as quantize() makes it.
    state.dtype = COMPUTE
    return weight


def serialize(name: str, weight) -> dict[str, torch.Tensor]:
    """The 4-bit weight `name` as a model folder stores it, each entry by its name there: the packed bytes under
    `name`, each quant_state entry under "<name>.<key>" (what bitsandbytes' Linear4bit._save_to_state_dict and
    transformers' save_pretrained write)."""
    return {name: weight.data, **{f"{name}.{key}": t for key, t in weight.quant_state.as_dict(packed=True).items()}}
