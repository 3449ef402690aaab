"""Fine-tune a causal LM with FSDP + 4-bit (QLoRA) + LoRA. The training loop, written out.

    python train.py                                   # tiny built-in model and task, one process
    torchrun --nproc_per_node 2 train.py              # the same, sharded over two ranks (GPUs, or CPU with gloo)
    torchrun --nproc_per_node 8 train.py --model meta-llama/Llama-3.1-8B --dataset data.jsonl
    torchrun --nproc_per_node 2 train.py --save_every 100 --resume auto  # continue where a killed run stopped
    python train.py --config configs/llama3-8b-24gb.yaml --dataset data.jsonl  # flags from a file; these override it
"""
import argparse
import collections
import dataclasses
import json
import math
import os
import resource
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, NamedTuple

import cli
import config_file
import settings
from settings import Config

# The caching allocator's default fixed-size segments fragment under FSDP's gather-and-free pattern, reserving memory
# that is never allocated; segments that grow in place keep reserved near allocated (BENCHMARKS.md, "The allocator
# setting"). Set before the first CUDA allocation; a value the user exported wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
def flag_parser() -> argparse.ArgumentParser:
    """argparse generated from Config, so each flag, default and help is written once. Underscores or dashes.
    A path setting's ~ is expanded by the flag's `type`, which argparse applies to a string default (a --config
    file's value) as it does to a value from the command line."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = {"default": f.default, "help": f.metadata["help"] + " (default: %(default)s)"}
        if f.type is bool:  # not type=bool: bool("False") is True
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = os.path.expanduser if f.metadata.get("path") else f.type
            parser.add_argument(*flags, type=kind, choices=f.metadata.get("choices"), **kwargs)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """The settings of a run, validated. Each comes from the first of: the command line, the --config file
    (config_file.read), the built-in model's own settings when --model is it (settings.BUILTIN_CONFIG), Config."""
    parser, fields = flag_parser(), dataclasses.fields(Config)
    file = parser.parse_known_args(argv)[0].config
    from_file = config_file.read(Path(file), fields) if file else {}
    parser.set_defaults(**from_file)
    if parser.parse_known_args(argv)[0].model == settings.BUILTIN_MODEL:
        parser.set_defaults(**{**config_file.read(settings.BUILTIN_CONFIG, fields), **from_file})
    cfg = Config(**vars(parser.parse_args(argv)))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Combinations that cannot work fail here, on every rank, before anything is loaded."""
    for name in ["lr", "lora_alpha", "max_grad_norm", "weight_decay", "eval_fraction", "lora_dropout"]:
        if not math.isfinite(getattr(cfg, name)):  # NaN fails every comparison below, and would pass them all
            raise ValueError(f"--{name} must be a finite number, got {getattr(cfg, name)}")
    positive = ["seq_len", "batch_size", "grad_accum", "lr", "lora_rank", "lora_alpha", "log_every", "dist_timeout",
                "sample_tokens"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ["max_steps", "epochs", "warmup_steps", "weight_decay", "max_grad_norm", "save_every", "keep_last",
                 "max_bad_steps", "show", "tiled_mlp"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise ValueError("nothing to train: set --max_steps or --epochs")
    if cfg.eval_every < 0:
        raise ValueError(f"--eval_every must be >= 0, got {cfg.eval_every}")
    if not 0 <= cfg.eval_fraction <= 0.5:  # held out of the training data: more than half is a slip (0.9999)
        raise ValueError(f"--eval_fraction must be in [0, 0.5], got {cfg.eval_fraction}")
    if not 0 <= cfg.seed < 2**32:  # numpy's range, which the eval carve-out's shuffle takes it to
        raise ValueError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.seq_len < 2:
        raise ValueError(f"--seq_len must be at least 2: a row's first token is never a target, got {cfg.seq_len}")
    if cfg.eval_split and cfg.eval_fraction:
        raise ValueError("give --eval_split or --eval_fraction, not both")
    if cfg.eval_every and not (cfg.eval_split or cfg.eval_fraction):  # else it would evaluate nothing, silently
        raise ValueError(f"--eval_every {cfg.eval_every}: there is no eval data to evaluate; hold some out with "
                         "--eval_fraction 0.05, or give --eval_split (a split of --dataset, or a file)")
    if cfg.packing and cfg.group_by_length:
        raise ValueError("--packing already fills rows; --group_by_length applies to padded batches only")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.offload_activations and cfg.grad_checkpointing != "non_reentrant":
        raise ValueError("--offload_activations moves the inputs that checkpointed layers keep; it needs "
                         f"--grad_checkpointing non_reentrant (got {cfg.grad_checkpointing})")
    if cfg.cpu_offload and not torch.cuda.is_available():
        raise ValueError("--cpu_offload moves GPU shards to CPU memory; there is no GPU here")
    if cfg.sharding == "hybrid_shard" and os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1"):
        raise ValueError("--sharding hybrid_shard shards inside a node and replicates across nodes, but all ranks are "
                         "on one node: use --sharding full_shard")
    if cfg.cpu_offload and cfg.grad_checkpointing == "none" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise ValueError(offload.NEEDS_RECOMPUTE)
    if not lora.parse_targets(cfg.lora_targets):  # which also refuses a pattern that does not compile
        raise ValueError("--lora_targets is empty")
    if lora.EXPERTS in lora.parse_targets(cfg.lora_targets) and cfg.use_dora:
        raise ValueError(f"--use_dora applies to linears, not to --lora_targets {lora.EXPERTS!r} (PEFT has no DoRA on "
                         f"the experts' tensors either): drop {lora.EXPERTS!r}, or --use_dora")
    if lora.EXPERTS in lora.parse_targets(cfg.lora_targets) and cfg.lora_dropout > 0:
        raise ValueError(f"--lora_targets {lora.EXPERTS!r} needs --lora_dropout 0: dropout applies to a layer's input, "
                         "which an update of the experts' weights cannot (PEFT refuses such adapters too)")
    reporting.parse(cfg.report_to)  # an unknown backend, or one not installed, with the pip command
    data.read_chat_template(cfg.chat_template)  # a missing file, before the tokenizer loads
    generate.load_prompts(cfg.sample_prompts, cfg.dataset)  # a missing file, not after minutes of loading a 70B


if __name__ == "__main__":  # --help, and a flag argparse refuses, are answered before the libraries below load
    cli.check_flags(flag_parser())

# ----------------------------------------------------------------------------------------------------------------------
# The libraries, imported once the command line is read: torch, transformers and bitsandbytes take seconds to load.
# (validate above uses them too: it runs after they are loaded, in parse_config.)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import PretrainedConfig, PreTrainedTokenizerBase  # noqa: E402

import builtin  # noqa: E402
import checkpointing  # noqa: E402
import data  # noqa: E402
import dora  # noqa: E402
import fsdp_wrap  # noqa: E402
import fused  # noqa: E402
import host_memory  # noqa: E402
import generate  # noqa: E402
import lora  # noqa: E402
import model_loading  # noqa: E402
import moe_lora  # noqa: E402
import offload  # noqa: E402
import out_folder  # noqa: E402
import peft_format  # noqa: E402
import quantization  # noqa: E402
import reporting  # noqa: E402
import run_folder  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup

SHARE_GPU = "RANKS_SHARE_GPU"  # the environment variable of init_distributed's ranks sharing GPU 0


def init_distributed(timeout_s: int) -> tuple[int, int, int, torch.device]:
    """rank, local rank, world size and device, from torchrun's environment; one process without torchrun. A process
    group the caller made is kept (benchmark.py's rank 0 of a fake world).

    RANKS_SHARE_GPU=1 puts every rank of a node on GPU 0, talking through gloo, which stages CUDA tensors through
    host memory (NCCL refuses two ranks on one device): the sharded CUDA path with real numerics on one GPU. Slow:
    for tests, not for training."""
    rendezvous = {}  # torchrun's: from the environment
    if "RANK" not in os.environ:
        # Plain `python train.py`: a process group of one, whose rendezvous store lives in this process. No port: a
        # free port picked here could be taken by another socket before the group binds it.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        rendezvous = dict(store=dist.HashStore(), rank=0, world_size=1)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    share = os.environ.get(SHARE_GPU) == "1"
    device = torch.device("cpu")
    if torch.cuda.is_available():
        local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), torch.cuda.device_count()
        if local_world > gpus and not share:  # else rank `gpus` dies in set_device with "invalid device ordinal"
            raise cli.Refusal(f"{local_world} ranks on this node but {gpus} GPU(s): lower --nproc_per_node to {gpus}, "
                             f"or set {SHARE_GPU}=1 to run them all on GPU 0 through gloo (slow; for tests)")
        device = torch.device("cuda", 0 if share else local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Always a timeout: a rank that dies or diverges must turn into an error on the others, not an endless hang.
        backend = "nccl" if device.type == "cuda" and not share else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **rendezvous)
    return rank, local_rank, world, device


def print0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


# ----------------------------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: Config, model_dir: Path, device: torch.device, rank: int,
                adapter_dir: Path | None = None) -> torch.nn.Module:
    """Stream the 4-bit base onto the device, add LoRA (identically on every rank, or loaded from `adapter_dir`),
    then shard and checkpoint."""
    attention = data.packed_attention(device) if cfg.packing else None
    keep_on = torch.device("cpu") if host_memory.held_in_host_memory(cfg, device) else device
    model = model_loading.load_model(model_dir, cfg.quant, device, progress=rank == 0, attn_implementation=attention,
                                     keep_on=keep_on)
    quantized, experts = model_loading.quantized_weights(model), quantization.packed_shells(model)
    if quantized:  # an expert tensor is 3-D: all of one MoE layer's experts of one kind
        print0(f"base: {len(quantized)} weights in 4 bits" + (f", {len(experts)} of them MoE expert tensors"
                                                               if experts else ""))
    layer_cls = model_loading.decoder_layer_class(model)
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank: FSDP does not broadcast it
    linears, experts = lora.split_targets(cfg.lora_targets)
    # LoRA goes straight to the GPU even where the base waits in CPU memory: it is small (168M parameters for an 8B
    # model at r=64), its init there is one kernel per matrix instead of a loop on the CPU (BENCHMARKS.md, "What each
    # change bought"), and every world size then draws the same A from the same generator. FSDP moves the
    # CPU-resident rest unit by unit as it wraps. DoRA's magnitudes, ||W|| of each layer, are computed there too.
    lora_args = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, device)
    adapter = dora.DoRALinear if cfg.use_dora else lora.LoRALinear
    names = lora.inject_lora(model, linears, layer_cls, *lora_args, adapter) if linears else []
    if experts:  # the MoE experts' 3-D tensors too
        names += moe_lora.inject_experts_lora(model, layer_cls, *lora_args)
    if adapter_dir is not None:  # resuming: the full weights go in before FSDP shards them
        peft_format.load_adapter(model, adapter_dir)
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ across ranks, as their data does
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kinds = collections.Counter(name.split(".")[-1] for name in names)
    counts = ", ".join(f"{k} x{n}" for k, n in kinds.items())
    print0(f"{'DoRA' if cfg.use_dora else 'LoRA'} r={cfg.lora_rank} on {len(names)} linears or expert tensors "
           f"({counts}): {n_lora / 1e6:.2f}M trainable parameters")
    model = fsdp_wrap.wrap_model(model, layer_cls, device, wrapping=wrapping_of(cfg, device))
    if model.weight_stream is not None:
        print0(f"--cpu_offload on one GPU: the weights of {len(model.weight_stream.layers)} decoder layers stay in "
               f"pinned host memory ({model.weight_stream.host_bytes / 2**30:.2f} GiB), each copied to the GPU ahead "
               "of its use")
    return model


def wrapping_of(cfg: Config, device: torch.device) -> fsdp_wrap.Wrapping:
    """The flags that say how fsdp_wrap.wrap_model shards, recomputes, compiles and offloads."""
    compile = "inductor" if cfg.compile and device.type == "cuda" else None  # CPU (tests, gloo): eager
    return fsdp_wrap.Wrapping(sharding=cfg.sharding, cpu_offload=cfg.cpu_offload,
                              grad_checkpointing=cfg.grad_checkpointing, compile=compile,
                              offload_activations=cfg.offload_activations, tiled_mlp=cfg.tiled_mlp)


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of --lr at each step: linear warmup, then cosine or linear decay to 0, or constant."""
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:  # `step` counts steps done: step k = step + 1 trains at lr * k / (N + 1)
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
        return decay[cfg.lr_schedule]
    return fn


def warmup_warning(cfg: Config, total_steps: int) -> str | None:
    """Why the LR never reaches --lr when the warmup outlasts the run (step N + 1 is the first at --lr), else None."""
    if cfg.warmup_steps < total_steps:
        return None
    return (f"--warmup_steps {cfg.warmup_steps} outlasts the run's {total_steps} steps: the LR never reaches --lr "
            f"{cfg.lr:g}, only {total_steps / (cfg.warmup_steps + 1):.1%} of it; lower --warmup_steps below the steps")


# ----------------------------------------------------------------------------------------------------------------------
# One optimizer step


def n_targets(batch: dict) -> torch.Tensor:
    """Label tokens the loss counts: each predicts the token after it, so the first column never does."""
    return (batch["labels"][:, 1:] != data.IGNORE).sum()


def model_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that the model takes, on `device`."""
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "position_ids", "labels")
            if k in batch}


def loss_sum(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy of every label token in the batch (fused.CausalLMWithLoss), and their count."""
    return model(**model_inputs(batch, device)), n_targets(batch)


def train_step(model, optimizer, micro_batches: list[dict], cfg: Config, device: torch.device) -> dict:
    """Token-weighted loss over all micro-batches and ranks: 2 micro-batches of 4 give the gradient of 1 batch of 8.

    Each rank scales its summed token losses by world_size / (label tokens on all ranks): FSDP averages gradients
    over ranks, so the result is the gradient of the mean loss over every label token of the step.
    A non-finite loss or grad norm skips the update (both are global, so every rank skips): the weights and AdamW's
    moments stay as they were, and the caller still advances the step, the data and the LR schedule.
    """
    world = dist.get_world_size()
    n_labels = sum(n_targets(b) for b in micro_batches).to(device)
    dist.all_reduce(n_labels)
    n_labels = n_labels.clamp(min=1)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else model.no_sync():  # reduce-scatter gradients once, after the last micro-batch
            loss, _ = loss_sum(model, batch, device)
            (loss * world / n_labels).backward()
        total += loss.detach()
    grad_norm = model.clip_grad_norm_(cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    dist.all_reduce(total)
    loss = (total / n_labels).item()
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm.item()))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["num_tokens"] for b in micro_batches).to(device)
    dist.all_reduce(tokens)
    return {"loss": loss, "grad_norm": grad_norm.item(), "tokens": int(tokens), "skipped": skipped}


@torch.no_grad()
def evaluate(model, batches: list[dict], device: torch.device, stop: checkpointing.StopOnSignal) -> float | None:
    """Mean loss over every label token of the eval set, on all ranks together; None if a signal came first.

    A long evaluation would outlast the grace torchrun gives a signalled run (30 s), so it is abandoned at the next
    batch. The ranks agree before each batch: every forward is a collective, so all of them must stop at the same one.
    """
    model.eval()
    totals = torch.zeros(2, device=device)
    try:
        for batch in batches:
            if stop.agreed(device)[0]:  # (signalled, failed)
                return None
            loss, n = loss_sum(model, batch, device)
            totals += torch.stack([loss, n.float()])
        dist.all_reduce(totals)
    finally:
        model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


# The longest sequences that fitted at batch 1 under a 24 GiB cap, by the shape of the model: (hidden size, decoder
# layers) -> (what it is, tokens, the flags it took); out_of_memory quotes them. Measured on one H200 on 2026-12-01
# (BENCHMARKS.md, "Long sequences under a 24 GiB cap" and "70B on one GPU under a 24 GiB cap").
LONGEST_MEASURED = {(4096, 32): ("an 8B Llama-3 shape", 131_072, "--offload_activations --tiled_mlp 8192"),
                    (8192, 80): ("a 70B Llama-3 shape", 32_768,
                                 "--cpu_offload --offload_activations --tiled_mlp 8192 --lora_rank 16")}


def out_of_memory(cfg: Config, config, step: int) -> str:
    """What to change when a step runs out of GPU memory, with the longest sequence measured for this shape."""
    advice = (f"out of GPU memory in step {step}: lower --batch_size (now {cfg.batch_size}; raise --grad_accum to keep "
              f"the step size) or --seq_len (now {cfg.seq_len}); add --offload_activations (checkpointed layer inputs "
              "in CPU memory) and --tiled_mlp 8192 for long sequences, or --cpu_offload (parameters in CPU memory)")
    measured = LONGEST_MEASURED.get((config.hidden_size, config.num_hidden_layers))
    if measured:
        name, tokens, flags = measured
        advice += f". For {name}, {tokens:,} tokens fitted at batch 1 in 24 GiB with {flags} (BENCHMARKS.md)"
    return advice


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":  # reserved, not allocated: what the caching allocator holds is what can run out
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------------
# The run: data, then the model, then the loop


@dataclass
class Batches:
    """What the loop reads: this rank's share of the training rows, batched, and the eval batches."""
    loader: torch.utils.data.DataLoader
    evals: list[dict] | None
    steps_per_epoch: int
    rows: int
    fingerprint: str  # data.fingerprint of the training rows, kept in checkpoints
    probe: dict  # the start of the first row, every token a target: what fused.check_loss compares on


def prepare_batches(cfg: Config, tokenizer, vocab: int, device: torch.device) -> Batches:
    """Tokenized rows into per-rank batches; data that cannot fill a step or that the model cannot embed fails here,
    before the model loads."""
    rank, world = dist.get_rank(), dist.get_world_size()
    train_ds, eval_ds = data.prepare(cfg, tokenizer, int(os.environ.get("LOCAL_RANK", 0)), log=print0)
    top_id = max(max(x) for x in train_ds["input_ids"])
    if top_id >= vocab:
        raise model_loading.ModelFolderError(f"the tokenizer produced token id {top_id}, but the model has only "
                                             f"{vocab} embeddings: the tokenizer does not belong to this model")
    block_mask = data.packed_attention(device) == "sdpa"
    loader = data.build_loader(train_ds, cfg.batch_size, tokenizer.pad_token_id, rank, world, cfg.seed,
                               cfg.group_by_length, block_mask)
    evals = None if eval_ds is None else data.eval_batches(eval_ds, cfg.batch_size, tokenizer.pad_token_id, rank,
                                                           world, block_mask)
    if len(loader) < cfg.grad_accum and not cfg.show:  # --show inspects the rows and takes no step
        raise data.DataError(f"{len(train_ds)} rows cannot fill one step of {cfg.batch_size * cfg.grad_accum * world} "
                             f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} ranks): lower them "
                             "or add data")
    first = {k: v[:256] for k, v in train_ds[0].items()}  # short: the check's own logits are materialised whole
    probe = data.collate([{**first, "labels": first["input_ids"]}], tokenizer.pad_token_id, block_mask)
    return Batches(loader, evals, len(loader) // cfg.grad_accum, len(train_ds), data.fingerprint(train_ds), probe)


def find_resume(cfg: Config, out_dir: Path, run: dict,
                model_config) -> tuple[Path | None, checkpointing.TrainerState | None]:
    """The checkpoint to continue from and its state, or (None, None); a mismatch is refused before the model loads."""
    path = checkpointing.select_resume(cfg.resume, out_dir)
    if path is None:
        return None, None
    state = checkpointing.read_state(path)
    checkpointing.check_resumable(state, path, run, {f.name: f.metadata for f in dataclasses.fields(Config)},
                                  model_config)
    return path, state


class StepLog:
    """Rank 0's record of each step: the progress line, metrics.jsonl (one JSON object per step, and a step 0 with
    the eval loss before training), --report_to's backends, and the history train() returns. A resumed run's
    metrics.jsonl and samples.jsonl keep the lines up to the checkpoint's step.

    A line that cannot be written (a full disk) is cut off the file, kept, and `error` set: the run then saves and
    stops (run_steps), and the line is tried once more after the save (raise_unwritten)."""

    def __init__(self, cfg: Config, out_dir: Path, total_steps: int, step: int, load_s: float,
                 report: reporting.Reporters):
        self.cfg, self.total_steps, self.load_s, self.history, self.report = cfg, total_steps, load_s, [], report
        self.rank0 = dist.get_rank() == 0
        self.bar = tqdm(total=total_steps, initial=step, desc="training", disable=not self.rank0)
        self.path, self.file, self.unwritten, self.error = out_dir / "metrics.jsonl", None, "", None
        self.eval_before = None
        if self.rank0:
            run_folder.cut_back(out_dir / "samples.jsonl", step)
            self.file = run_folder.open_metrics(self.path, step)

    def record(self, m: dict) -> None:
        if not self.history:
            m["load_s"] = self.load_s
        self.history.append(m)
        self.bar.update()
        if not self.rank0:
            return
        self._append(json.dumps(m) + "\n", m["step"])
        self.report.step(m)
        if m["step"] % self.cfg.log_every == 0 or m["step"] == self.total_steps:
            self.bar.set_postfix_str(f"loss {m['loss']:.4f} lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
                                     f"tok/s {m['tokens_per_s']:,.0f} mem {m['peak_mem_gib']:.2f}GiB"
                                     + (f" eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""))

    def record_eval_before(self, eval_loss: float) -> None:
        """The eval loss before the first step: metrics.jsonl's step 0, where the eval curve starts."""
        self.eval_before = eval_loss
        if self.rank0:
            self._append(json.dumps({"step": 0, "eval_loss": eval_loss}) + "\n", 0)
            self.report.step({"step": 0, "eval_loss": eval_loss})

    def end_progress(self) -> None:
        """Close the progress bar before the lines that end the run: tqdm draws an open bar again under each line."""
        self.bar.close()

    def _append(self, lines: str, step: int) -> None:
        self.unwritten += lines
        size = self.path.stat().st_size
        try:
            self.file = self.file or self.path.open("a")
            self.file.write(self.unwritten)
            self.file.flush()
            self.unwritten = ""
        except OSError as e:
            self.error = self.error or (f"writing {self.path} failed at step {step} "
                                        f"({out_folder.disk_full(e, self.path) or e})")
            self.close_file()
            os.truncate(self.path, size)  # no torn line

    def raise_unwritten(self, saved: Path | OSError) -> None:
        """After a failed write and the save that followed it: every rank raises rank 0's error, then what the save
        did (the checkpoint it wrote, or its own error, which names the checkpoints left); a collective."""
        if self.rank0 and isinstance(saved, Path):  # the checkpoint went in, so the lines may too
            self._append("", self.history[-1]["step"])
        error = [self.error]
        dist.broadcast_object_list(error, src=0)
        then = (f"saved {saved}: continue with --resume auto" if isinstance(saved, Path) else
                f"the checkpoint could not be saved either: {saved}")
        raise OSError(f"{error[0]}; {then}") from None

    def close_file(self) -> None:
        try:
            if self.file:
                self.file.close()
        except OSError:  # what its buffer held could not be written: _append cuts it off the file
            pass
        self.file = None

    def close(self) -> None:
        self.bar.close()
        self.close_file()


class BadSteps:
    """Consecutive skipped steps (non-finite loss or grad norm), and the last good checkpoint: one whose next step
    had a finite loss. (A step can stay finite while it blows the weights up; the checkpoint after it is not good.)"""

    def __init__(self, limit: int, resumed_from: Path | None):
        self.limit, self.in_a_row, self.last_saved, self.good = limit, 0, resumed_from, None

    def after(self, m: dict) -> None:
        self.in_a_row = self.in_a_row + 1 if m["skipped"] else 0
        self.good = self.good if m["skipped"] else self.last_saved
        if m["skipped"]:
            print0(f"step {m['step']}: loss {m['loss']}, grad norm {m['grad_norm']}: update skipped "
                   f"({self.in_a_row} in a row)")
        if self.limit and self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} consecutive steps (up to step {m['step']}) had a non-finite loss or grad norm; "
                f"stopping. The last checkpoint whose next step was finite is {self.good or 'none'}: check the data "
                "near these steps, or start again with a lower --lr")

    def check_last(self, history: list[dict]) -> None:
        """--max_bad_steps 0 runs on; a run whose last step was not finite has still failed."""
        if history and history[-1]["skipped"]:
            raise RuntimeError(f"the last step, {history[-1]['step']}, had a non-finite loss or grad norm, so no "
                               f"adapter was saved. The last checkpoint whose next step was finite is "
                               f"{self.good or 'none'}; start again with a lower --lr, or check the data")


class Position(NamedTuple):
    """Where a run stands: optimizer steps done, the epoch, and the steps done in that epoch."""
    step: int
    epoch: int
    step_in_epoch: int


@dataclass(frozen=True)
class LoopHooks:
    """What run_steps calls around the steps it takes: the record, the save and the samples, on schedule."""
    save: Callable[[int, tuple[int, int]], Path]  # (step, (epoch, steps done in it)) -> the checkpoint written
    sample: Callable[[int], None]  # greedy samples of the prompts after this step; a collective
    log: StepLog
    bad: BadSteps
    stop: checkpointing.StopOnSignal


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, *, cfg: Config, batches: Batches, start: Position,
              total_steps: int, hooks: LoopHooks) -> bool:
    """Steps from `start` to total_steps: evaluating, saving and sampling on schedule. Returns whether a signal
    stopped the run (after saving a checkpoint)."""
    device = model.compute_device  # FSDP's; with --cpu_offload on several GPUs the parameters live on the CPU
    step, epoch, skip = start
    log, bad, stop = hooks.log, hooks.bad, hooks.stop
    model.train()
    while step < total_steps:
        batches.loader.sampler.set_epoch(epoch)  # an epoch's order is a function of (seed, epoch) alone
        micro = iter(batches.loader)
        for _ in range(skip * cfg.grad_accum):  # resumed mid-epoch: pass the micro-batches already trained on
            next(micro)
        for in_epoch in range(skip, min(batches.steps_per_epoch, skip + total_steps - step)):
            t0, lr = time.perf_counter(), scheduler.get_last_lr()[0]
            m = train_step(model, optimizer, [next(micro) for _ in range(cfg.grad_accum)], cfg, device)
            scheduler.step()
            step += 1
            m.update(step=step, epoch=epoch, lr=lr, tokens_per_s=m["tokens"] / (time.perf_counter() - t0),
                     peak_mem_gib=peak_memory_gib(device))
            evaluating = batches.evals and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps)
            eval_loss = evaluate(model, batches.evals, device, stop) if evaluating else None
            if eval_loss is not None:
                m["eval_loss"] = eval_loss
            log.record(m)
            bad.after(m)
            signalled, unwritten = stop.agreed(device, log.error is not None)
            stopping = unwritten or (signalled and step < total_steps)  # a line not written (full disk): save, stop
            saving = bool(cfg.save_every) and step % cfg.save_every == 0
            if stopping or saving:
                more_in_epoch = in_epoch + 1 < batches.steps_per_epoch  # else the next step opens the next epoch
                try:
                    bad.last_saved = hooks.save(step, (epoch, in_epoch + 1) if more_in_epoch else (epoch + 1, 0))
                except OSError as e:
                    if unwritten:  # the line failed first (a full disk): that is the news, the save's failure follows
                        log.raise_unwritten(e)
                    raise
            if unwritten:
                log.raise_unwritten(bad.last_saved)
            if stopping:
                log.end_progress()
                abandoned = f" evaluation at step {step} abandoned;" if evaluating and eval_loss is None else ""
                print0(f"got {stop.signal or 'a signal on another rank'}:{abandoned} saved {bad.last_saved}; continue "
                       "with --resume auto")
                return True
            if step < total_steps and ("eval_loss" in m or saving):
                hooks.sample(step)
        skip, epoch = 0, epoch + 1
    return False


def summary(cfg: Config, model_dir: Path, log: StepLog, wall_s: float, training_s: float, prompts: list[str]) -> str:
    """What rank 0 prints when a run ends: time and throughput, the losses, the files, and the commands to go on
    with. The train loss is a mean over the last tenth of the steps: one batch's loss is mostly its batch."""
    steps, out = log.history, Path(cfg.output_dir)
    tokens = sum(m["tokens"] for m in steps)
    finite = [m["loss"] for m in steps if not m["skipped"]]
    last = finite[-max(1, len(finite) // 10):]
    over = f"mean of the last {len(last)} steps" if len(last) > 1 else "the last step"
    counted = f"{len(steps)} steps" + (f" ({steps[0]['step']} to {steps[-1]['step']})" if steps[0]["step"] > 1 else "")
    evals = [m["eval_loss"] for m in steps if "eval_loss" in m]
    if not evals:
        evaluated = "no eval data (hold some out with --eval_fraction 0.05, or give --eval_split)"
    elif log.eval_before is None:
        evaluated = f"eval loss {evals[-1]:.4f}"
    else:
        evaluated = f"eval loss {log.eval_before:.4f} before training, {evals[-1]:.4f} after"
    files = ["adapter_model.safetensors and adapter_config.json (PEFT's format)", run_folder.TRAIN_CONFIG,
             "metrics.jsonl"] + ["samples.jsonl"] * bool(prompts) + ["tensorboard/"] * ("tensorboard" in cfg.report_to)
    base, merged = cfg.model, f"{out}-merged"
    served_rank = None if cfg.use_dora else peft_format.vllm_max_lora_rank(cfg.lora_rank)  # no DoRA in vLLM
    commands = [
        ["python", "merge.py", "--model", base, "--adapter", str(out), "--out", merged],
        ["python", "generate.py", "--model", base, "--adapter", str(out), "--prompt", (prompts or ["Hello"])[0]],
        ["vllm", "serve", str(model_dir) if base == settings.BUILTIN_MODEL else base, "--enable-lora", "--lora-modules",
         f"{out.name}={out}", "--max-lora-rank", str(served_rank)] if served_rank else ["vllm", "serve", merged]]
    return "\n".join([f"done in {duration(wall_s)}: {counted}, {tokens:,} tokens, {tokens / training_s:,.0f} tokens/s "
                      f"over {duration(training_s)} of training",
                      f"train loss {sum(last) / len(last):.4f} ({over}); {evaluated}",
                      f"saved in {out}/: {', '.join(files)}",
                      "next: merge the adapter into a standalone checkpoint, sample from it, or serve it with vLLM:",
                      *(f"  {shlex.join(c)}" for c in commands)])


def duration(seconds: float) -> str:
    """45.2 s, 2 min 45 s, 3 h 05 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def warn(warning: str | None) -> None:
    """Print a warning on rank 0, if there is one."""
    if warning is not None:
        print0(f"warning: {warning}")


def claim_output_dir(cfg: Config) -> IO[str] | None:
    """Check, lock and prepare output_dir for this run (--resume, --overwrite); the lock (rank 0), None elsewhere and
    with --show, which only reads."""
    if cfg.show:
        return None
    out_dir = Path(cfg.output_dir)
    checkpointing.check_output_dir(out_dir, cfg.resume, cfg.overwrite, cfg.dataset)  # before it is made
    lock = run_folder.lock_output_dir(out_dir)  # before anything in the folder is read or removed
    try:
        checkpointing.prepare_output_dir(out_dir, cfg.resume, cfg.overwrite)
    except BaseException:
        if lock:
            lock.close()
        raise
    return lock


def resolve_for_base(cfg: Config, device: torch.device) -> tuple[Config, Path, PretrainedConfig,
                                                                 PreTrainedTokenizerBase]:
    """The base's folder, config and tokenizer, and `cfg` with --quant and --prompt_format as they apply to them,
    kept so in the run's config."""
    model_dir = builtin.model_dir(cfg.model)
    config = model_loading.read_config(model_dir)  # an architecture transformers lacks fails before tokenizing
    # --quant as it applies to this base (auto: a pre-quantized checkpoint's own type)
    cfg = dataclasses.replace(cfg, quant=model_loading.resolve_quant(config, cfg.quant, log=print0))
    tokenizer = model_loading.load_tokenizer(model_dir)
    # the prompt format as it applies to this tokenizer (auto: chat where it has a template)
    cfg = dataclasses.replace(cfg, prompt_format=data.resolve_prompt_format(cfg.prompt_format, tokenizer,
                                                                            cfg.chat_template, log=print0))
    return cfg, model_dir, config, tokenizer


def show_rows(cfg: Config, batches: Batches, tokenizer: PreTrainedTokenizerBase) -> None:
    """--show: the first rows as tokenized, trained spans marked (in color on a terminal), and the data's statistics."""
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print0(data.describe(batches.loader.dataset, tokenizer, cfg.seq_len, cfg.show, color))


def checked_prompts(cfg: Config, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> list[str]:
    """The prompts sampled at each save, each rendered once now: one that cannot be ({"messages"} without a
    template) or that fills the model's context alone fails before the model loads, not at the first save."""
    prompts = generate.load_prompts(cfg.sample_prompts, cfg.dataset)
    ids = [generate.prompt_ids(prompt, tokenizer, cfg.prompt_format, cfg.system_prompt) for prompt in prompts]
    named = f"--sample_prompts {Path(cfg.sample_prompts).expanduser()}" if cfg.sample_prompts else "built-in"
    generate.refuse_prompts_that_fill(ids, config, named)
    return prompts


def run_identity(cfg: Config, world: int, batches: Batches, model_dir: Path) -> dict:
    """What a checkpoint records of the run, and a resume must match (checkpointing.check_resumable)."""
    return dict(world_size=world, steps_per_epoch=batches.steps_per_epoch, base_model=cfg.model,
                base_fingerprint=model_loading.fingerprint(model_dir), data_fingerprint=batches.fingerprint,
                config=dataclasses.asdict(cfg))


def nothing_left(out_dir: Path, resume_from: Path | None, resumed: checkpointing.TrainerState | None,
                 total_steps: int) -> bool:
    """Whether out_dir holds a run with nothing left to do, whose files a resume must leave as they are (and says
    so): the last step's checkpoint, and the final adapter whole (write_final puts adapter_config.json in last)."""
    if not (resumed and resumed.step == total_steps and (out_dir / "adapter_config.json").is_file()):
        return False
    print0(f"{out_dir} holds a finished run: {resume_from.name} is its last step, {total_steps}, and its "
           "adapter is saved; nothing to do (to train longer, start a new run in another --output_dir: another "
           "--max_steps or --epochs is refused on resume)")
    return True


def open_reporters(cfg: Config, resumed: checkpointing.TrainerState | None) -> reporting.Reporters:
    """--report_to's backends, continuing a resumed run's (W&B's run id) from the checkpoint's step."""
    out_dir = Path(cfg.output_dir)
    return reporting.open_reporters(
        reporting.parse(cfg.report_to), out_dir, dataclasses.asdict(cfg), resumed.step if resumed else 0,
        resumed.reporting if resumed else {}, run_folder.last_metrics_step(out_dir / "metrics.jsonl"))


def load_for_training(cfg: Config, model_dir: Path, device: torch.device, rank: int, resume_from: Path | None,
                      batches: Batches, model_type: str, turns: host_memory.Turns) -> tuple[torch.nn.Module, float]:
    """build_model, timed, and checked against the model's own objective; the model and its load time in seconds.

    The ranks of a node build it turns.at_once at a time, in turns that every rank takes part in
    (host_memory.loaders_at_once). A turn ends with the ranks agreeing whether one of them failed
    (host_memory.stop_if_any_failed), not at a bare barrier, where the others would only lose contact with it."""
    t0 = time.perf_counter()
    local_rank, ranks = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    # a launcher that sets no LOCAL_WORLD_SIZE (init_distributed takes one) counts 1 rank a node: one turn, for all
    mine = min(local_rank // turns.at_once, turns.count - 1)
    for turn in range(turns.count):
        if turns.count == 1:
            model = build_model(cfg, model_dir, device, rank, adapter_dir=resume_from)
            break
        first, last = turn * turns.at_once, min((turn + 1) * turns.at_once, ranks) - 1
        print0(f"loading, turn {turn + 1} of {turns.count}: local rank {first}"
               + (f" to {last}" if last > first else "") + " of each node")
        failed = None
        if turn == mine:
            try:
                model = build_model(cfg, model_dir, device, rank, adapter_dir=resume_from)
            except Exception as e:  # raised below, once every rank knows
                failed = e
        host_memory.stop_if_any_failed(failed, rank, device)
    load_s = time.perf_counter() - t0
    print0(f"model loaded, adapted and sharded in {load_s:.1f}s")
    fused.check_loss(model, model_inputs(batches.probe, device), model_type)  # the model's own objective
    return model, load_s


def make_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the trainable (LoRA) weights, and the LR schedule laid over the planned steps."""
    # fused: one kernel for all LoRA tensors instead of several per tensor (CUDA only)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def restore(resume_from: Path | None, resumed: checkpointing.TrainerState | None, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> Position:
    """The checkpoint's optimizer, schedule and RNG states loaded (build_model loaded its LoRA weights), and where it
    stopped; the start of training when there is none."""
    if not resumed:
        return Position(0, 0, 0)
    checkpointing.load_checkpoint(resume_from, model, optimizer, scheduler)
    print0(f"resumed from {resume_from}: step {resumed.step}, epoch {resumed.epoch}")
    return Position(resumed.step, resumed.epoch, resumed.step_in_epoch)


def eval_before(model: torch.nn.Module, evals: list[dict], device: torch.device, stop: checkpointing.StopOnSignal,
                log: StepLog) -> None:
    """The eval loss before the first step, recorded as step 0 (unless a signal came first)."""
    if (eval_loss := evaluate(model, evals, device, stop)) is not None:
        log.record_eval_before(eval_loss)


def finish(cfg: Config, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, run: dict, hooks: LoopHooks,
           total_steps: int) -> None:
    """After the last step: a run whose last step was not finite fails; else the final adapter, and its samples."""
    hooks.log.end_progress()
    hooks.bad.check_last(hooks.log.history)
    checkpointing.save_final(Path(cfg.output_dir), model, dataclasses.asdict(cfg), run["base_fingerprint"], tokenizer)
    hooks.sample(total_steps)


def lost_contact(e: RuntimeError, rank: int, dist_timeout: int) -> str | None:
    """What a rank says when a collective failed because another rank is gone; None for any other error."""
    if not (isinstance(e, dist.DistError) or "gloo" in str(e)):  # NCCL: DistError; gloo: a RuntimeError naming it
        return None
    slow = (f" A rank waits --dist_timeout ({dist_timeout} s) for the others: if one was busy, not dead, "
            "raise it." if any(w in str(e).lower() for w in ("timed out", "timeout")) else "")
    return (f"rank {rank}: lost contact with another rank ({e}).{slow} The launcher's log names the rank that "
            "failed; once it is back, continue with --resume auto.")


def train(cfg: Config) -> list[dict]:
    """The whole run, as an outline; returns the per-step metrics (also written to output_dir/metrics.jsonl)."""
    started = time.perf_counter()
    rank, _, world, device = init_distributed(cfg.dist_timeout)
    stop, lock, log, report = checkpointing.StopOnSignal(), None, None, None
    try:
        warn(None if cfg.use_dora else peft_format.vllm_rank_warning(cfg.lora_rank))
        out_dir, lock = Path(cfg.output_dir), claim_output_dir(cfg)
        cfg, model_dir, config, tokenizer = resolve_for_base(cfg, device)
        moe_lora.check_targets(config, cfg.lora_targets)  # targets that select nothing fail before tokenizing
        turns = host_memory.loaders_at_once(cfg, model_dir, device, log=print0)  # too big for host memory: now
        batches = prepare_batches(cfg, tokenizer, config.vocab_size, device)  # a bad dataset fails in seconds
        if cfg.show:
            show_rows(cfg, batches, tokenizer)
            return []
        prompts = checked_prompts(cfg, tokenizer, config)
        total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
        warn(warmup_warning(cfg, total_steps))
        run = run_identity(cfg, world, batches, model_dir)
        resume_from, resumed = find_resume(cfg, out_dir, run, config)
        if nothing_left(out_dir, resume_from, resumed, total_steps):
            return []
        report = open_reporters(cfg, resumed)  # a backend that cannot start fails here, before the model loads

        model, load_s = load_for_training(cfg, model_dir, device, rank, resume_from, batches, config.model_type,
                                          turns)
        optimizer, scheduler = make_optimizer(cfg, model, device, total_steps)
        start = restore(resume_from, resumed, model, optimizer, scheduler)
        print0(f"{batches.rows} rows, {cfg.batch_size * cfg.grad_accum * world} per step, {total_steps} steps on "
               f"{world} rank(s), {device.type}")

        def save(step: int, data_position: tuple[int, int]) -> Path:
            state = checkpointing.TrainerState(step, *data_position, **run, reporting=report.state())
            return checkpointing.save_checkpoint(out_dir, state, model, optimizer, scheduler, tokenizer, cfg.keep_last)

        def sample(step: int) -> None:  # a collective; rank 0 writes
            report.samples(step, generate.log_samples(model, tokenizer, prompts, out_dir / "samples.jsonl", step,
                                                      device=device, max_new_tokens=cfg.sample_tokens,
                                                      prompt_format=cfg.prompt_format, system_prompt=cfg.system_prompt))

        log = StepLog(cfg, out_dir, total_steps, start.step, load_s, report)
        hooks = LoopHooks(save, sample, log, BadSteps(cfg.max_bad_steps, resume_from), stop)
        if batches.evals and start.step == 0:  # where the eval loss starts, for the summary to compare with
            eval_before(model, batches.evals, device, stop, log)
        stop.begin_training()  # from here a signal lets the step finish and saves it
        training = time.perf_counter()
        try:
            if run_steps(model, optimizer, scheduler, cfg=cfg, batches=batches, start=start, total_steps=total_steps,
                         hooks=hooks):
                return log.history  # stopped by a signal, checkpoint saved
        except torch.cuda.OutOfMemoryError as e:
            raise torch.cuda.OutOfMemoryError(out_of_memory(cfg, config, start.step + len(log.history) + 1)) from e
        training = time.perf_counter() - training
        finish(cfg, model, tokenizer, run, hooks, total_steps)
        if log.history:  # empty when a finished run is resumed
            print0(summary(cfg, model_dir, log, time.perf_counter() - started, training, prompts))
        return log.history
    except checkpointing.Interrupted:  # a signal before training: the handler said so, and there is nothing to save
        return []
    except RuntimeError as e:
        if (message := lost_contact(e, rank, cfg.dist_timeout)) is not None:
            print(message, flush=True)
        raise
    finally:
        for held in (log, report, lock):  # closing the lock file releases the output_dir
            if held:
                held.close()
        stop.restore()
        dist.destroy_process_group()


if __name__ == "__main__":
    status = cli.main(parse_config, train)  # 0, or a refusal's; a bug raises, with its traceback
    # Leave without the interpreter's teardown: gloo's worker threads can abort a finished process while Python
    # destroys the objects they still reference (pytorch/pytorch#179291). Everything is saved and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
