"""Merge a trained LoRA (or DoRA) adapter into its base model: one standalone checkpoint that transformers, vLLM or any
Hugging Face-compatible server loads with no custom code.

    python merge.py --model tiny --adapter out --out merged
    python merge.py --model meta-llama/Llama-3.1-70B --adapter runs/70b --out merged-70b --no-verify

Every adapted linear becomes W' = W + B @ A * alpha / r (in fp32, rounded once to --dtype); of a DoRA adapter
(use_dora), m * W' / ||W'||, the norm by output feature (dora.merged_weight); every other tensor is
copied. The merge streams like the loader: one base tensor at a time is read with safe_open, merged, and appended to
its output shard at once, so memory stays near one tensor (and its fp32 copy) for any model size, on CPU or GPU. The
output is sharded safetensors with model.safetensors.index.json, config.json, the tokenizer files of the adapter's run
(with the chat template training rendered with) and its train_config.json (its prompt format, which generate.py reads),
and a model card (README.md) naming the base, the adapter and the training config.

MoE experts (an adapter with target_parameters): each adapted experts tensor W (experts, out, in) becomes
W_e + B_e @ A_e * alpha / r for every expert e, the update PEFT's ParamWrapper defines (moe_lora.ExpertsLoRA).
transformers' model holds a layer's experts fused in that 3-D tensor, while save_pretrained writes one tensor per
expert, and the merged checkpoint keeps the layout of the base: a layer's experts are read and fused as the loader
fuses them, merged (for the dequantized semantics quantized whole first, as the loader quantizes them: the double
quantization's statistics span the whole tensor), then split back by transformers' own save-time conversion. While
they are merged, memory holds that layer's experts tensor and its fp32 copy, not one expert's.

Which W. The adapter was trained against the 4-bit base, dequant(quant(W)), not against W itself:
  --semantics dequantized   (default) W is the 4-bit base dequantized, quantized exactly as the loader does in
                            training: the merged model is the trained model up to bf16 rounding of W', the model
                            that was evaluated during training. The 4-bit rounding error is baked into a 16-bit
                            checkpoint.
  --semantics bf16          W is the original 16-bit base weight: what PEFT's merge_and_unload gives, and what merged
                            QLoRA models often are. It differs from the model as trained by the base's 4-bit rounding
                            error (NF4: ~9% relative per weight), which the adapter never saw and may have learned
                            to correct: on the built-in model this changed 9 of 48 greedy answers.
A pre-quantized base (a bitsandbytes 4-bit checkpoint) holds no 16-bit W: its W is the stored 4-bit weight,
dequantized as the loader computes it, so only the dequantized semantics apply and nothing is quantized again.
The check at the end loads the model as trained (4-bit base + adapter, through our loader) and reports its max logit
difference to the merged model, so the cost of either choice is a number, not a guess.
"""
import argparse
import inspect
import json
import math
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cli

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # --dtype; DTYPES maps them to torch's
SEMANTICS = ("bf16", "dequantized")


def flags() -> argparse.ArgumentParser:
    """merge.py's command line; parse_args adds the defaults, written once in merge()."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the base the adapter was trained on: folder, Hub id or 'tiny'")
    parser.add_argument("--adapter", required=True, help="a training output_dir (or its checkpoint-N) with "
                                                          "adapter_model.safetensors and adapter_config.json")
    parser.add_argument("--out", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="of the merged weights")
    parser.add_argument("--semantics", choices=SEMANTICS,
                        help="merge into the original base weights (bf16) or the 4-bit dequantized ones; see above")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction,
                        help="compare logits with the model as trained; loads the model twice, so --no-verify for "
                             "models that do not fit in memory")
    parser.add_argument("--shard_size_mb", type=int, help="size of each output file (memory use does not depend on it)")
    parser.add_argument("--allow_other_base", action="store_true",
                        help="merge an adapter into another base than the one it was trained on, on purpose")
    return parser


if __name__ == "__main__":  # --help, and a flag argparse refuses, are answered before the libraries below load
    cli.check_flags(flags())

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoConfig, PretrainedConfig  # noqa: E402

import builtin  # noqa: E402
import conversions  # noqa: E402
import dora  # noqa: E402
import fused  # noqa: E402
import lora  # noqa: E402
import model_loading  # noqa: E402
import moe_lora  # noqa: E402
import out_folder  # noqa: E402
import peft_format  # noqa: E402
import quantization  # noqa: E402
import run_folder  # noqa: E402
from model_loading import SAFETENSORS_DTYPES, TensorEntry  # noqa: E402

DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class MergeError(cli.Refusal):
    """An adapter, base or output folder the merge cannot use; the message says what is wrong and how to fix it."""


def merge(model: str, adapter: str | Path, out: str | Path, dtype: str = "bf16", semantics: str = "dequantized",
          overwrite: bool = False, verify: bool = True, shard_size_mb: int = 500, progress: bool = True,
          allow_other_base: bool = False) -> float | None:
    """Write base + adapter, merged, to `out`; returns the max logit difference to the model as trained (or None).
    An adapter trained on another base than `model` is refused unless `allow_other_base` (run_folder.check_base)."""
    if dtype not in DTYPES or semantics not in SEMANTICS:
        raise MergeError(f"--dtype {dtype!r} / --semantics {semantics!r}: choose from {list(DTYPES)} / {SEMANTICS}")
    if shard_size_mb <= 0:
        raise MergeError(f"--shard_size_mb must be positive, got {shard_size_mb}")
    base_dir, adapter_dir, out_dir = builtin.model_dir(model), Path(adapter), Path(out)
    adapter_config = peft_format.read_adapter_config(adapter_dir)
    run_folder.check_base(adapter_dir, model, base_dir, allow_other_base, MergeError)
    train_config = run_folder.read_run_config(adapter_dir)  # the base as trained, and for the model card
    quant = run_folder.trained_quant(adapter_dir, base_dir, MergeError)
    if out_dir.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise MergeError(f"--out {out_dir} is the base model or adapter folder; write the merge somewhere else")
    checked = out_folder.check_out_folder(out_dir, overwrite, MergeError)

    # Everything is checked from the headers before a byte is written: base against its config, adapter against base.
    base = read_base(base_dir, semantics)
    updates = plan_updates(base, adapter_dir, adapter_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The dequantized semantics of a 16-bit base: W goes through the loader's 4-bit round trip first
    round_trip = quant if semantics == "dequantized" and quant != "none" and not base.stats else None

    # Written into a hidden sibling, renamed into place at the end: an interrupted merge never looks complete.
    with out_folder.written_whole(out_dir, checked, MergeError) as tmp:
        t0 = time.perf_counter()
        n_shards, n_bytes = write_weights(base, updates, adapter_dir, peft_format.adapter_scaling(adapter_config), tmp,
                                          DTYPES[dtype], round_trip, shard_size_mb * 2**20, device, progress)
        config = base.config
        config.dtype = DTYPES[dtype]  # saved as "dtype": from_pretrained(dtype="auto") picks it
        if base.stats:  # the merged weights are 16-bit: transformers must not read them as 4-bit
            del config.quantization_config
        config.save_pretrained(tmp)
        copied = copy_tokenizer(base_dir, adapter_dir, tmp)
        adapted = {update.tensor for update in updates.values()}
        print(f"merged {len(adapted)} adapted weights into {len(base.entries)} tensors: {n_shards} shards, "
              f"{n_bytes / 2**20:,.1f} MiB, in {time.perf_counter() - t0:.1f}s")
        if not any(name.startswith("tokenizer") for name in copied):
            print(f"warning: {base_dir} has no tokenizer files; add them to {out_dir} before serving it")
        diffs = max_logit_diffs(base_dir, adapter_dir, tmp, quant, DTYPES[dtype], device) if verify else None
        if diffs:
            print(f"max |logit difference| merged vs as trained ({quant_name(quant)} base + adapter): {diffs[0]:.4g}; "
                  f"the adapter itself moves the logits by up to {diffs[1]:.4g}")
        write_model_card(tmp, out_dir.name, model, adapter_dir, adapter_config, train_config, semantics, quant, dtype,
                         diffs)
    print(f"saved to {out_dir}")
    return diffs[0] if diffs else None


def copy_tokenizer(base_dir: Path, adapter_dir: Path, out_dir: Path) -> list[str]:
    """The tokenizer files and the recorded prompt format (train_config.json) of the adapter's run folder, which hold
    the chat template training rendered with (the base's may be another, or none), and the base's generation config;
    the base's tokenizer for an adapter whose folder holds none. Returns the names copied."""
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return out_folder.copy_beside(base_dir, out_dir)
    copied = out_folder.copy_beside(adapter_dir, out_dir)
    for name, folder in [("generation_config.json", base_dir), (run_folder.TRAIN_CONFIG, adapter_dir)]:
        if (folder / name).is_file():
            copied.append(Path(shutil.copy(folder / name, out_dir)).name)
    return copied


@dataclass
class Base:
    """The base model as the merge reads it, known from its config and safetensors headers alone."""
    config: PretrainedConfig
    entries: dict[str, TensorEntry]  # its tensors as the merged checkpoint holds them (dense_entries), in file order
    stats: dict[str, dict[str, TensorEntry]]  # each 4-bit weight's quant_state entries by name (none in a 16-bit base)
    skeleton: torch.nn.Module  # the 16-bit model on meta: the names and shapes of the model's tensors
    sources: dict[str, list[str]]  # model tensor -> the base's tensors it is read from (itself, or one per expert)


def read_base(base_dir: Path, semantics: str) -> Base:
    """The base, checked against its config from the headers (model_loading.check_weights)."""
    config = model_loading.read_config(base_dir)
    entries = model_loading.index_weights(base_dir)
    packed = model_loading.packed_weights(entries, model_loading.weights_quant(config))
    skeleton = model_loading.build_skeleton(config, "none")
    sources = model_loading.weights_sources(entries, skeleton)
    model_loading.check_weights(entries, skeleton, packed, sources)
    if packed and semantics == "bf16":
        raise MergeError(f"--semantics bf16 adds the update to the 16-bit base weights, and {base_dir} is "
                         "pre-quantized to 4 bits: they are not in it. Leave --semantics at dequantized, or pass the "
                         "16-bit original as --model")
    stats = {weight: {part: entries[part] for part in parts[1:]} for weight, parts in packed.items()}
    return Base(config, dense_entries(entries, stats, skeleton), stats, skeleton,
                {name: list(names) for name, names in sources.items()})


# ----------------------------------------------------------------------------------------------------------------------
# The plan: which base weight gets which update, and which tensor goes into which output shard


@dataclass
class Update:
    """One adapted tensor of the model: its LoRA factors' keys in the adapter file, and the base's tensors it is read
    from and written back to (Base.sources): itself, or an experts tensor's one per expert as save_pretrained wrote
    them."""
    tensor: str
    factors: tuple[str, ...]  # A's and B's keys, and DoRA's magnitude's
    sources: list[str]


def plan_updates(base: Base, adapter_dir: Path, config: dict) -> dict[str, Update]:
    """Base tensor name -> the update it takes part in, every LoRA shape checked against the tensor it updates."""
    entries = base.entries
    source = f"the adapter in {adapter_dir} (trained on {config.get('base_model_name_or_path')!r})"
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    experts = plan_experts(base, shapes, config, source)
    updates = {name: update for update in experts for name in update.sources}
    factors: dict[str, set[str]] = {}
    magnitude = dora.MAGNITUDE.removeprefix("lora_")  # DoRA's, after "<path>.lora_" as A's and B's
    of_experts = {key for update in experts for key in update.factors}
    for key in (key for key in shapes if key not in of_experts):  # in the file's order: errors name the first
        # "base_model.model.<path>.lora_A.weight"
        path, sep, rest = key.removeprefix(peft_format.PEFT_PREFIX).rpartition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight", magnitude):
            raise MergeError(f"unexpected tensor {key} in {source}: only lora_A and lora_B weights (and DoRA's "
                             "lora_magnitude_vector) can be merged")
        factors.setdefault(path, set()).add(rest)
    parts = {"A.weight", "B.weight"} | ({magnitude} if config.get("use_dora") else set())
    for path, found in factors.items():
        if found != parts:
            raise MergeError(f"{path} has {sorted('lora_' + p for p in found)} in {source}, where its config "
                             f"(use_dora: {bool(config.get('use_dora'))}) needs {sorted('lora_' + p for p in parts)}: "
                             "the file is incomplete, or beside another adapter's config")
        weight, r = f"{path}.weight", config["r"]
        a, b = (shapes[peft_format.peft_key(f"{path}.{ab}.weight")] for ab in lora.FACTORS)
        if weight not in entries:
            raise MergeError(f"{source} adapts {path}, which this base model does not have: "
                             "merge it into the model it was trained on")
        out_features, in_features = entries[weight].shape
        m = shapes.get(peft_format.peft_key(f"{path}.{dora.MAGNITUDE}.weight"), (out_features,))
        if a != (r, in_features) or b != (out_features, r) or m != (out_features,):
            raise MergeError(f"{source} does not fit {weight} of shape {list(entries[weight].shape)}: it has lora_A "
                             f"{list(a)} and lora_B {list(b)} (r={r}). It was trained on another base model; "
                             "merge it into that one")
        keys = tuple(peft_format.peft_key(f"{path}.{ab}.weight")
                     for ab in lora.FACTORS + ((dora.MAGNITUDE,) if config.get("use_dora") else ()))
        updates[weight] = Update(weight, keys, [weight])
    return updates


def plan_experts(base: Base, shapes: dict[str, tuple[int, ...]], config: dict, source: str) -> list[Update]:
    """The experts tensors the adapter's target_parameters name, as PEFT matches them (the tensor's full name, or a
    suffix of it after a dot), each with its factors found in the adapter and checked against its shape."""
    targets = config.get("target_parameters") or []
    found = moe_lora.expert_tensors(base.skeleton, model_loading.decoder_layer_class(base.skeleton))
    tensors = [name for name in found if any(name == t or name.endswith(f".{t}") for t in targets)]
    unmatched = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in tensors)]
    if unmatched:
        raise MergeError(f"{source} adapts {unmatched} (target_parameters), which this base model does not have (its "
                         f"MoE experts tensors: {sorted({n.rpartition('.')[2] for n in found}) or 'none'}): merge it "
                         "into the model it was trained on")
    updates, r = [], config["r"]
    for tensor, (a_key, b_key) in peft_format.expert_peft_keys(tensors).items():
        lost = [key for key in (a_key, b_key) if key not in shapes]
        if lost:
            raise MergeError(f"{source} adapts {tensor} (target_parameters) but holds no {lost[0]}: the file is "
                             "incomplete")
        experts, out_features, in_features = found[tensor][2]
        a, b = shapes[a_key], shapes[b_key]
        if a != (r * experts, in_features) or b != (out_features, r * experts):
            raise MergeError(f"{source} does not fit {tensor} of shape {[experts, out_features, in_features]}: it has "
                             f"lora_A {list(a)} and lora_B {list(b)} (r={r}, so ({r} x experts, in) and (out, {r} x "
                             "experts) were expected). It was trained on another base model; merge it into that one")
        updates.append(Update(tensor, (a_key, b_key), base.sources[tensor]))
    return updates


def plan_shards(entries: dict[str, TensorEntry], dtypes: dict[str, torch.dtype], max_bytes: int) -> list[list[str]]:
    """Tensor names of each output shard, in reading order; a shard exceeds max_bytes only to hold one huge tensor.

    Planned from the headers, so each shard's name ("-of-N") and its own header are known before its first tensor.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, entry in entries.items():
        nbytes = math.prod(entry.shape) * dtypes[name].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def dense_entries(entries: dict[str, TensorEntry], stats: dict[str, dict[str, TensorEntry]],
                  skeleton: torch.nn.Module) -> dict[str, TensorEntry]:
    """The base's tensors as a 16-bit checkpoint holds them: a pre-quantized weight (`stats`: its quant_state
    entries) as its bf16 tensor ((out, in), or an experts tensor's (experts, out, in) that quantize.py
    --quantize_experts stores fused), its quant_state entries dropped; the rest as they are."""
    quant_state = {name for entries_of in stats.values() for name in entries_of}
    dense = {}
    for name, entry in entries.items():
        if name in stats:  # the 16-bit skeleton's own tensor of that name gives the shape
            dense[name] = TensorEntry(entry.file, tuple(skeleton.get_parameter(name).shape), "BF16")
        elif name not in quant_state:
            dense[name] = entry
    return dense


def output_dtypes(entries: dict[str, TensorEntry], dtype: torch.dtype) -> dict[str, torch.dtype]:
    """--dtype for every floating tensor; anything else (integer buffers) keeps its stored type."""
    stored = {name: SAFETENSORS_DTYPES[entry.dtype] for name, entry in entries.items()}
    return {name: dtype if stored[name].is_floating_point else stored[name] for name in entries}


# ----------------------------------------------------------------------------------------------------------------------
# The streaming merge


def read_tensor(base: Base, name: str, device: torch.device) -> torch.Tensor:
    """One base tensor alone; a pre-quantized weight (in `base.stats`, with its quant_state entries) dequantized on
    `device`, as the loader computes it. The file is opened for each tensor and closed right after: safe_open
    memory-maps it, and mapped pages count as resident until unmapped, so a 5 GB input shard kept open would add up
    to 5 GB to the merge's memory. Opening costs a header parse, nothing next to the tensor itself."""
    def read(name: str, entry: TensorEntry) -> torch.Tensor:
        with safe_open(str(entry.file), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    entry = base.entries[name]
    tensor = read(name, entry)
    if name in base.stats:
        stored = {name: tensor.to(device)} | {part: read(part, e).to(device) for part, e in base.stats[name].items()}
        weight = model_loading.unpack_4bit(name, stored, entry.shape, entry.file)
        tensor = quantization.dequantize(weight)
    return tensor


def read_factors(adapter_dir: Path, keys: tuple[str, ...]) -> list[torch.Tensor]:
    """One tensor's A and B (and DoRA's magnitude), read as the base tensors are (a 70B r=64 adapter is 3 GB)."""
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt", device="cpu") as f:
        return [f.get_tensor(key) for key in keys]


def merged_weight(w: torch.Tensor, factors: list[torch.Tensor], scaling: float, round_trip: str | None,
                  device: torch.device) -> torch.Tensor:
    """W + B @ A * scaling in fp32 (for an experts tensor, expert by expert; with DoRA's magnitude m,
    m * (W + B @ A * scaling) / its norm by output feature), W being the base weight as read or, with `round_trip`
    (a 4-bit type), its 4-bit round trip (see the module docstring)."""
    w = w.to(device)
    if round_trip is not None:  # exactly as the loader quantizes
        w = quantization.dequantize(quantization.quantize(w, round_trip, device))
    a, b, *magnitude = (f.to(device, torch.float32) for f in factors)
    if magnitude:
        return dora.merged_weight(w.float(), a, b, magnitude[0], scaling)
    add = moe_lora.add_experts_update if w.dim() == 3 else lora.add_update
    return add(w.float(), a, b, scaling)


def merge_update(base: Base, update: Update, adapter_dir: Path, scaling: float, round_trip: str | None,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of one update, merged, by their names in the base: {name: W'} for a linear's weight (or experts
    stored fused); for experts stored one per expert, all of a layer's tensor's experts, fused as the loader fuses
    them (conversions.fuse), merged, and split back as save_pretrained splits them."""
    if update.sources == [update.tensor]:
        w = read_tensor(base, update.tensor, device)
    else:
        parts = ((name, read_tensor(base, name, device)) for name in update.sources)
        [(_, w)] = conversions.fuse(parts, {update.tensor: update.sources}, base.skeleton)
    w = merged_weight(w, read_factors(adapter_dir, update.factors), scaling, round_trip, device)
    if update.sources == [update.tensor]:
        return {update.tensor: w}
    return conversions.split(base.skeleton, update.tensor, w)


def safetensors_header(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> bytes:
    """The start of a safetensors file: 8 bytes of header length, then a JSON header giving each tensor's dtype, shape
    and byte range in the data that follows, in this order. Known from shapes alone, so a shard can be written one
    tensor at a time instead of being assembled in memory first (as safetensors' save_file does)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # "format": "pt" is what transformers expects
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad with spaces so that the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_weights(base: Base, updates: dict[str, Update], adapter_dir: Path, scaling: float, out_dir: Path,
                  dtype: torch.dtype, round_trip: str | None, shard_bytes: int, device: torch.device,
                  progress: bool = True) -> tuple[int, int]:
    """Stream every base tensor, merged where adapted, into the shards of `out_dir`; returns (shards, bytes).

    At any moment one tensor is in memory (with its fp32 copy while it is merged): it is read, merged, cast and
    appended to its shard's file, then dropped. An experts tensor stored one per expert is merged whole when its
    first expert's turn comes; the others wait, merged, for theirs (the next few tensors in the files).
    """
    entries = base.entries
    dtypes = output_dtypes(entries, dtype)
    shards = plan_shards(entries, dtypes, shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    waiting: dict[str, torch.Tensor] = {}  # merged, not yet written
    bar = tqdm(total=len(entries), desc="merging", unit="tensor", disable=not progress)
    for file, names in zip(files, shards):
        with open(out_dir / file, "wb") as f:
            f.write(safetensors_header({name: (entries[name].shape, dtypes[name]) for name in names}))
            for name in names:
                if name in updates and name not in waiting:
                    waiting |= merge_update(base, updates[name], adapter_dir, scaling, round_trip, device)
                tensor = waiting.pop(name) if name in waiting else read_tensor(base, name, device)
                if tuple(tensor.shape) != entries[name].shape:  # the header above is written: never a wrong size
                    raise RuntimeError(f"{name} was merged as {list(tensor.shape)}, the base holds "
                                       f"{list(entries[name].shape)}: transformers' split of the experts changed")
                written = tensor.to("cpu", dtypes[name]).contiguous()
                if written.is_floating_point() and not written.isfinite().all():  # one pass: the cost of a copy
                    raise MergeError(not_finite(base, name, tensor, adapter_dir, dtypes[name]))
                f.write(written.reshape(-1).view(torch.uint8).numpy())  # raw little-endian bytes, as the format says
                bar.update()
    bar.close()
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    total = sum(math.prod(entries[name].shape) * dtypes[name].itemsize for name in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), total


def not_finite(base: Base, name: str, merged: torch.Tensor, adapter_dir: Path, dtype: torch.dtype) -> str:
    """Why the tensor `name`, `merged` as it is about to be cast to `dtype` and written, is not finite there: the
    base's own tensor (read again), the adapter's update of it, or the range of `dtype`."""
    entry = base.entries[name]
    if not read_tensor(base, name, torch.device("cpu")).isfinite().all():
        how = "dequantizes to" if name in base.stats else "holds"
        return f"{name} in {entry.file} {how} NaN or inf: the base is damaged; download or quantize it again"
    if not merged.isfinite().all():
        return (f"{name} plus the adapter's update of it is NaN or inf: the adapter in {adapter_dir} is damaged; "
                "write it again")
    return (f"{name}, merged, exceeds the range of {str(dtype).removeprefix('torch.')} (largest |value| "
            f"{merged.abs().max().item():.4g}): merge with --dtype bf16")


# ----------------------------------------------------------------------------------------------------------------------
# The check and the model card


def max_logit_diffs(base_dir: Path, adapter_dir: Path, merged_dir: Path, quant: str, dtype: torch.dtype,
                    device: torch.device) -> tuple[float, float]:
    """On 32 fixed token ids: max |logit difference| of the merged model to the model as trained (base with `quant`
    + adapter, through our loader), and, for scale, of the trained model to its base. One model in memory at a time."""
    from transformers import AutoModelForCausalLM

    vocab = AutoConfig.from_pretrained(merged_dir).vocab_size
    tokens = torch.randint(vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    trained = model_loading.load_model(base_dir, quant, device, progress=False).eval()
    with torch.no_grad():  # the base alone first: what the adapter changes, for scale
        base = trained(tokens).logits.float()  # checked after the model as trained, whose check names the module
        peft_format.apply_adapter(trained, adapter_dir)
        as_trained = finite_logits(trained, tokens, "the model as trained (base + adapter)")
    if not base.isfinite().all():
        raise MergeError("the base alone gives logits that are not finite (NaN or inf) on the check's 32 tokens, "
                         "where the model as trained gives finite ones: its scale cannot be reported")
    del trained
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        logits = merged(tokens).logits.float()
    if not logits.isfinite().all():  # its weights were checked as they were written (not_finite)
        name = {v: k for k, v in DTYPES.items()}[dtype]
        raise MergeError("the merged model's logits are not finite (NaN or inf) on the check's 32 tokens, where the "
                         f"model as trained gives finite ones: its weights are finite, so its activations overflow "
                         f"--dtype {name}" + ("; merge with --dtype bf16, the range of the model as trained"
                                              if dtype == torch.float16 else ""))
    return (logits - as_trained).abs().max().item(), (as_trained - base).abs().max().item()


def finite_logits(model: torch.nn.Module, tokens: torch.Tensor, which: str) -> torch.Tensor:
    """The model's logits in fp32, or a MergeError naming `which` model and its first module whose output is not
    finite, as train.py and generate.py refuse such a model (fused.nonfinite_logits)."""
    logits = model(tokens).logits.float()
    if not logits.isfinite().all():
        raise MergeError(f"{which}: {fused.nonfinite_logits(model, lambda: model(tokens))}")
    return logits


def quant_name(quant: str) -> str:
    return "16-bit" if quant == "none" else quant


def write_model_card(out_dir: Path, title: str, base: str, adapter_dir: Path, adapter_config: dict, train_config: dict,
                     semantics: str, quant: str, dtype: str, diffs: tuple[float, float] | None) -> None:
    how = ("into the original base weights (as PEFT's merge_and_unload does)" if semantics == "bf16" or quant == "none"
           else f"into the {quant}-dequantized base weights the adapter was trained against")
    modules = adapter_config.get("target_modules") or []  # None when only experts are adapted; PEFT allows a regex
    targets = ([modules] if isinstance(modules, str) else modules) + (adapter_config.get("target_parameters") or [])
    kind = "DoRA" if adapter_config.get("use_dora") else "LoRA"
    lines = ["---", f"base_model: {base}", "library_name: transformers",
             f"tags: [{kind.lower()}, q{kind.lower()}, merged]", "---", "", f"# {title}", "",
             f"`{base}` with the {kind} adapter `{adapter_dir}` (r={adapter_config['r']}, "
             f"alpha={adapter_config['lora_alpha']}, targets {', '.join(targets)}) "
             f"merged {how}, saved in {dtype}. It loads with `AutoModelForCausalLM.from_pretrained` and no extra "
             "code.", ""]
    if diffs:
        lines += [f"Max logit difference to the model as trained ({quant_name(quant)} base + adapter), on 32 tokens: "
                  f"{diffs[0]:.4g} (the adapter itself moves the logits by up to {diffs[1]:.4g}).", ""]
    if train_config:
        lines += ["## Training config", "", "```json", json.dumps(train_config, indent=2), "```", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with merge()'s defaults."""
    parser = flags()
    parser.set_defaults(**{k: p.default for k, p in inspect.signature(merge).parameters.items()
                           if k in ("dtype", "semantics", "verify", "shard_size_mb")})
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    merge(**vars(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli.main(parse_args, lambda args: merge(**vars(args))))
