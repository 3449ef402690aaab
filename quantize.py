"""Quantize a 16-bit checkpoint to 4 bits once, then train on the result many times.

    python quantize.py --model meta-llama/Llama-3.1-70B --out llama-70b-nf4     # 140 GB of bf16 in, ~40 GB out
    torchrun --nproc_per_node 8 train.py --model llama-70b-nf4 ...              # its packed bytes load as they are

The output is the checkpoint transformers' save_pretrained writes for a model loaded with BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type=--quant, bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=bfloat16):
each 4-bit weight as its packed bytes beside its quant_state entries, and quantization_config in config.json, so that
AutoModelForCausalLM.from_pretrained loads it as 4-bit too. Which linears are quantized, and how, is what the loader
does in training (model_loading.build_skeleton, quantization.quantize): a model built from the output holds the bytes
of one built from the 16-bit original. Linears it leaves in 16 bits (lm_head) are listed in llm_int8_skip_modules.

A mixture of experts' experts are no linears: transformers keeps each layer's fused in 3-D tensors (experts, out, in)
and its bitsandbytes quantization leaves them in 16 bits, most of such a model's bytes (~58 GB of Qwen3-30B-A3B's
~61). --quantize_experts writes them in 4 bits too, each fused tensor under the model's own name
(`model.layers.0.mlp.experts.gate_up_proj`) beside its quant_state entries, as the loader quantizes them from a 16-bit
checkpoint: the checkpoint is about 4x smaller, and train.py, merge.py and generate.py load it with the same bytes.
transformers' from_pretrained refuses it: its experts have other shapes than the 16-bit ones it expects. Without
the flag the output is what from_pretrained loads.

It streams: each tensor is read, quantized on --device and added to the current shard, and a full shard is written
out, so memory stays near one shard (--shard_size_mb). The folder is written under a temporary name and renamed at
the end: an interrupted run never looks finished, and --overwrite replaces an older folder only then.
"""
import argparse
import copy
import inspect
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import cli

QUANTS = ("nf4", "fp4")


def flags() -> argparse.ArgumentParser:
    """quantize.py's command line; parse_args adds the defaults, written once in quantize_checkpoint()."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the 16-bit checkpoint: folder, Hub id or 'tiny'")
    parser.add_argument("--out", required=True, help="folder for the 4-bit checkpoint")
    parser.add_argument("--quant", choices=QUANTS, help="4-bit type")
    parser.add_argument("--device", help="where to quantize (default: cuda if there is a GPU, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds a model")
    parser.add_argument("--shard_size_mb", type=int, help="size of each output file; memory use is about one of them")
    parser.add_argument("--quantize_experts", action="store_true",
                        help="an MoE's experts in 4 bits too: ~4x smaller, loads in train.py, merge.py and generate.py "
                             "but not in transformers' from_pretrained (which expects them in 16 bits)")
    return parser


if __name__ == "__main__":  # --help, and a flag argparse refuses, are answered before the libraries below load
    cli.check_flags(flags())

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import PretrainedConfig  # noqa: E402

import builtin  # noqa: E402
import conversions  # noqa: E402
import model_loading  # noqa: E402
import out_folder  # noqa: E402
import quantization  # noqa: E402
import shard_reader  # noqa: E402


class QuantizeError(cli.Refusal):
    """A source or output folder quantize.py cannot use; the message says what is wrong and how to fix it."""


def quantize_checkpoint(model: str, out: str | Path, quant: str = "nf4", device: str | None = None,
                        overwrite: bool = False, shard_size_mb: int = 1000, progress: bool = True,
                        quantize_experts: bool = False) -> Path:
    """Write `model` (a 16-bit folder, Hub id or 'tiny') quantized to `quant` into `out`, with its tokenizer;
    an MoE's experts too with `quantize_experts` (see the module docstring)."""
    model_dir, out = builtin.model_dir(model), Path(out)
    config = model_loading.read_config(model_dir)
    if model_loading.weights_quant(config) is not None:
        raise QuantizeError(f"{model_dir} is already quantized to {model_loading.weights_quant(config)}: train on "
                            "it as it is, or quantize its 16-bit original")
    if out.resolve() == model_dir.resolve():
        raise QuantizeError(f"--out {out} is the source folder; write the 4-bit checkpoint somewhere else")
    if quant not in QUANTS:  # before plan_load, which would take 'none' and 'auto'
        raise QuantizeError(f"--quant {quant!r}: choose one of {QUANTS}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = model_loading.plan_load(model_dir, quant)  # the source checked against its config before a byte is written
    shells = stored_4bit(plan.model, quantize_experts)
    if quantize_experts and not quantization.packed_shells(plan.model):
        raise QuantizeError(f"--quantize_experts: {model_dir} has no MoE experts (a dense model); drop the flag")
    # A checkpoint tensor read under another name (an expert stored alone, Mixtral's block_sparse_moe) goes where the
    # model tensor it fuses into goes
    target_of = model_loading.fused_into(plan)
    where = {name: device if target_of.get(name, name) in shells else torch.device("cpu")
             for names in plan.by_file.values() for name in names}
    tensors, total = shard_reader.read_ahead(plan.by_file, where, error=model_loading.ModelFolderError), len(where)
    if quantize_experts:  # each layer's experts fused as the model holds them, one layer at a time, under its names
        tensors = conversions.fuse(tensors, plan.sources, plan.model)
        total -= sum(len(sources) - 1 for sources in plan.sources.values())
    return write_4bit(config, tensors, out, quant, device, overwrite, model_dir, shard_size_mb, progress, total,
                      quantize_experts)


def stored_4bit(skeleton: nn.Module, quantize_experts: bool = False) -> set[str]:
    """The weights a 4-bit checkpoint stores in 4 bits: the linears', and with `quantize_experts` the MoE experts'
    fused 3-D tensors. Without it those stay bf16, as transformers' bitsandbytes quantization leaves them (and as the
    loader then reads them)."""
    weights = model_loading.quantized_weights(skeleton)
    return weights if quantize_experts else weights - quantization.packed_shells(skeleton).keys()


def write_4bit(config: PretrainedConfig, tensors: Iterable[tuple[str, torch.Tensor]], out: str | Path,
               quant: str = "nf4", device: str | torch.device = "cpu", overwrite: bool = False,
               beside: Path | None = None, shard_size_mb: int = 1000, progress: bool = True,
               total: int | None = None, quantize_experts: bool = False) -> Path:
    """The 4-bit checkpoint of the model `config` describes, from its 16-bit tensors, into `out`; with the tokenizer
    and generation files of the folder `beside`, if given. `tensors` yields (name, tensor) as a state dict or a
    checkpoint names them, in any order, each once (tied copies are skipped), on any device. `quantize_experts`: an
    MoE's experts in 4 bits too, which needs each experts tensor fused, under the model's name (conversions.fuse). A
    synthetic checkpoint needs no model in memory:

        shapes = model_loading.build_skeleton(config, "none").state_dict()  # on meta: no memory
        write_4bit(config, ((n, torch.randn(t.shape, device="cuda") * 0.02) for n, t in shapes.items()), out, "nf4",
                   "cuda")

    The written folder is checked by the loader's own checks (every tensor there, with its quant_state) before it
    takes its name.
    """
    out, device = Path(out), torch.device(device)
    checked = out_folder.check_out_folder(out, overwrite, QuantizeError)
    if shard_size_mb < 0:
        raise QuantizeError(f"--shard_size_mb must be >= 0 (0: a shard per tensor), got {shard_size_mb}")
    skeleton = model_loading.build_skeleton(config, quant)
    shells = stored_4bit(skeleton, quantize_experts)
    experts = shells & quantization.packed_shells(skeleton).keys()
    tied = set(getattr(skeleton, "all_tied_weights_keys", {}) or {})  # saved once, as the embedding
    t0, written = time.perf_counter(), set()
    with out_folder.written_whole(out, checked, QuantizeError) as tmp:
        bar = tqdm(total=total, desc="quantizing", unit="tensor", disable=not progress)
        stored = (_stored(name, tensor, name in shells, quant, device, written) for name, tensor in tensors
                  if name not in tied)
        n_shards, n_bytes = _write_shards(stored, tmp, shard_size_mb * 2**20, bar)
        bar.close()
        if experts - written:  # they came one per expert, and were written so, in bf16
            raise QuantizeError(f"quantize_experts, but {sorted(experts - written)[0]} did not arrive as one fused "
                                f"tensor (experts, out, in): pass the tensors through conversions.fuse, which fuses "
                                "the experts that a checkpoint stores one per expert")
        config = copy.deepcopy(config)
        config.architectures = [type(skeleton).__name__]  # as save_pretrained records it
        config.dtype = torch.bfloat16  # of the tensors left in 16 bits
        # As transformers records a 4-bit model. The skip list names every linear left in 16 bits: with a list,
        # transformers quantizes all other linears, and without one it guesses (lm_head).
        config.quantization_config = quantization.stored_config(
            quant, sorted(n for n, m in skeleton.named_modules() if type(m) is nn.Linear))
        config.save_pretrained(tmp)
        if beside is not None:
            out_folder.copy_beside(beside, tmp)
            source = {"model": str(beside), "fingerprint": model_loading.fingerprint(beside)}
            (tmp / model_loading.QUANTIZED_FROM).write_text(json.dumps(source, indent=2) + "\n")
        model_loading.plan_load(tmp, quant)  # the loader's own checks, on what was written
    print(f"wrote {len(written)} weights in {quant} ({len(experts)} of them experts tensors) and the rest in bf16 to "
          f"{out}: {n_shards} shards, {n_bytes / 2**30:,.2f} GiB, in {time.perf_counter() - t0:.1f}s")
    return out


def _stored(name: str, tensor: torch.Tensor, quantize: bool, quant: str, device: torch.device,
            written: set[str]) -> dict[str, torch.Tensor]:
    """One tensor as the checkpoint stores it, on the CPU: a 4-bit weight (its name then added to `written`) as its
    packed bytes and quant_state entries, anything else as bf16 (as the loader keeps it; integer tensors as they
    are). An experts tensor (experts, out, in) is quantized whole, as the loader quantizes it: the same bytes."""
    if quantize:
        written.add(name)
        stored = quantization.serialize(name, quantization.quantize(tensor.to(device), quant, device))
    else:
        stored = {name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor}
    return {key: t.detach().to("cpu").contiguous() for key, t in stored.items()}


def _write_shards(stored: Iterable[dict[str, torch.Tensor]], out_dir: Path, shard_bytes: int,
                  bar: tqdm) -> tuple[int, int]:
    """Shards of about shard_bytes and their index, as save_pretrained names them; returns (shards, bytes). Only
    the shard being filled is in memory. Its final name ("-of-N") is known at the end, so shards are renamed then."""
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        files.append(out_dir / f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, files[-1], metadata={"format": "pt"})
        out_folder.readable(files[-1])
        weight_map.update(dict.fromkeys(shard, files[-1]))
        shard.clear()

    for tensors in stored:
        nbytes = sum(t.nbytes for t in tensors.values())
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard.update(tensors)  # a 4-bit weight and its quant_state: in one shard
        size, total = size + nbytes, total + nbytes
        bar.update()
    if shard:
        flush()
    names = {file: f"{file.stem}-of-{len(files):05d}.safetensors" for file in files}
    for file, name in names.items():
        file.rename(out_dir / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[f] for k, f in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(files), total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with quantize_checkpoint()'s defaults."""
    parser = flags()
    parser.set_defaults(**{k: p.default for k, p in inspect.signature(quantize_checkpoint).parameters.items()
                           if k in ("quant", "device", "shard_size_mb")})
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quantize_checkpoint(**vars(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli.main(parse_args, lambda args: quantize_checkpoint(**vars(args))))
