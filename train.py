"""Fine-tune a causal LM with FSDP + 4-bit (QLoRA) + LoRA. The training loop, written out.

    python train.py                                   # tiny built-in model and task, one process
    torchrun --nproc_per_node 2 train.py              # the same, sharded over two ranks (GPUs, or CPU with gloo)
    torchrun --nproc_per_node 8 train.py --model meta-llama/Llama-3.1-8B --dataset data.jsonl
    torchrun --nproc_per_node 2 train.py --save_every 100 --resume auto  # continue where a killed run stopped
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpointing
import data
import fsdp_wrap
import generate
import lora
import model_loading

# The caching allocator's default fixed-size segments fragment under FSDP's gather-and-free pattern: at batch 8 on an
# 8B model they reserved 8.6 GiB more than was ever allocated. Segments that grow in place keep reserved near allocated
# (BENCHMARKS.md). Set before the first CUDA allocation; a value the user exported wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


@dataclass
class Config:
    # what to train
    model: str = field(default=model_loading.BUILTIN_MODEL, metadata={"help": "local folder, Hub repo id, or 'tiny'"})
    dataset: str = field(default=data.BUILTIN_DATASET, metadata={"help": "Hub dataset id, local file or folder (.jsonl .json .parquet .csv .txt), or 'builtin'"})
    output_dir: str = field(default="out", metadata={"help": "adapters, metrics.jsonl and checkpoints go here"})
    # data (data.py)
    dataset_config: str = field(default="", metadata={"help": "Hub dataset configuration name"})
    dataset_split: str = field(default="train", metadata={"help": "Hub dataset split to train on"})
    dataset_format: str = field(default="auto", metadata={"choices": list(data.FORMATS), "help": "how examples are rendered; auto: from the columns"})
    field_map: str = field(default="", metadata={"help": "rename columns, ours=theirs: 'instruction=question,output=answer'"})
    chat_template: str = field(default="", metadata={"help": "'chatml', or a Jinja template, for tokenizers without one"})
    seq_len: int = field(default=512, metadata={"help": "longest row in tokens; longer prompts are cut first"})
    train_on_prompt: bool = field(default=False, metadata={"help": "also train on prompt tokens"})
    packing: bool = field(default=False, metadata={"help": "fill rows with whole examples, none attending to another"})
    group_by_length: bool = field(default=False, metadata={"help": "batch similar lengths together (without --packing)"})
    eval_split: str = field(default="", metadata={"help": "eval data: a split of --dataset, or a file"})
    eval_fraction: float = field(default=0.0, metadata={"help": "or carve this fraction out of the training data"})
    eval_every: int = field(default=0, metadata={"help": "steps between eval losses; 0: only at the end, if there is eval data"})
    # batch and length of training
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 means run --epochs"})
    epochs: int = field(default=1, metadata={"help": "passes over the data, when --max_steps is 0"})
    # optimization
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate of AdamW on the LoRA weights"})
    lr_schedule: str = field(default="cosine", metadata={"choices": ["cosine", "linear", "constant"], "help": "decay after warmup"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup: step k <= N trains at lr * k / (N + 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm; 0 disables"})
    # LoRA
    lora_rank: int = field(default=16, metadata={"help": "rank r of each update"})
    lora_alpha: float = field(default=32.0, metadata={"help": "the update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default=",".join(lora.DEFAULT_TARGETS), metadata={"help": "comma-separated module names or regexes"})
    # memory and sharding
    quant: str = field(default="nf4", metadata={"choices": list(model_loading.QUANT_TYPES), "help": "4-bit type of the base, or none (plain LoRA)"})
    sharding: str = field(default="full_shard", metadata={"choices": list(fsdp_wrap.SHARDING), "help": "FSDP strategy; hybrid_shard for several nodes"})
    cpu_offload: bool = field(default=False, metadata={"help": "keep parameter shards in CPU memory (GPU only)"})
    grad_checkpointing: str = field(default="non_reentrant", metadata={"choices": list(fsdp_wrap.CHECKPOINTING), "help": "activation checkpointing of decoder layers"})
    compile: bool = field(default=True, metadata={"help": "torch.compile the norms, rotary embedding and MLP activation of each decoder layer, and the loss (GPU only)"})
    # bookkeeping
    seed: int = field(default=0, metadata={"help": "data order and LoRA init"})
    log_every: int = field(default=1, metadata={"help": "steps between progress-line updates"})
    save_every: int = field(default=0, metadata={"help": "save a checkpoint to output_dir/checkpoint-N every N steps; 0: only the final adapter"})
    keep_last: int = field(default=0, metadata={"help": "keep only the newest K checkpoints; 0 keeps all"})
    resume: str = field(default="", metadata={"help": "'auto': continue from the newest checkpoint in output_dir (if any); or a checkpoint folder"})
    overwrite: bool = field(default=False, metadata={"help": "delete another run's checkpoints in output_dir instead of refusing to start"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop after this many consecutive skipped steps (non-finite loss or grad norm); 0: never"})
    dist_timeout: int = field(default=900, metadata={"help": "seconds a rank waits for the others before failing"})
    sample_prompts: str = field(default="", metadata={"help": "text file, one prompt per line, sampled greedily at each save into output_dir/samples.jsonl; '' = built-in prompts with --dataset builtin"})
    sample_tokens: int = field(default=64, metadata={"help": "longest sample, in new tokens"})


def parse_config(argv: list[str] | None = None) -> Config:
    """argparse generated from Config, so each flag, default and help is written once. Underscores or dashes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = {"default": f.default, "help": f.metadata["help"] + " (default: %(default)s)"}
        if f.type is bool:  # not type=bool: bool("False") is True
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*flags, type=f.type, choices=f.metadata.get("choices"), **kwargs)
    cfg = Config(**vars(parser.parse_args(argv)))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Combinations that cannot work fail here, on every rank, before anything is loaded."""
    for name in ["lr", "lora_alpha", "max_grad_norm", "weight_decay", "eval_fraction", "lora_dropout"]:
        if not math.isfinite(getattr(cfg, name)):  # NaN fails every comparison below, and would pass them all
            raise ValueError(f"--{name} must be a finite number, got {getattr(cfg, name)}")
    positive = ["seq_len", "batch_size", "grad_accum", "lr", "lora_rank", "lora_alpha", "log_every", "dist_timeout"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ["max_steps", "epochs", "warmup_steps", "weight_decay", "max_grad_norm", "save_every", "keep_last",
                 "max_bad_steps"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise ValueError("nothing to train: set --max_steps or --epochs")
    if cfg.eval_every < 0 or not 0 <= cfg.eval_fraction < 1:
        raise ValueError("--eval_every must be >= 0 and --eval_fraction in [0, 1)")
    if cfg.eval_split and cfg.eval_fraction:
        raise ValueError("give --eval_split or --eval_fraction, not both")
    if cfg.packing and cfg.group_by_length:
        raise ValueError("--packing already fills rows; --group_by_length applies to padded batches only")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.cpu_offload and not torch.cuda.is_available():
        raise ValueError("--cpu_offload moves GPU shards to CPU memory; there is no GPU here")
    if not lora.parse_targets(cfg.lora_targets):  # which also refuses a pattern that does not compile
        raise ValueError("--lora_targets is empty")


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup


def init_distributed(timeout_s: int) -> tuple[int, int, int, torch.device]:
    """rank, local rank, world size and device, from torchrun's environment; one process without torchrun."""
    rendezvous = {}  # torchrun's: from the environment
    if "RANK" not in os.environ:
        # Plain `python train.py`: a process group of one, whose rendezvous store lives in this process. No port: a
        # free port picked here could be taken by another socket before the group binds it.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        rendezvous = dict(store=dist.HashStore(), rank=0, world_size=1)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Always a timeout: a rank that dies or diverges must turn into an error on the others, not an endless hang.
    backend = "nccl" if device.type == "cuda" else "gloo"
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
    # Sharded over several GPUs, the whole 4-bit model may not fit one of them (70B: ~38 GB): quantize on the GPU,
    # keep the result in CPU memory, and let FSDP move each unit to the GPU as it shards it.
    keep_on = torch.device("cpu") if dist.get_world_size() > 1 and cfg.sharding != "no_shard" else device
    model = model_loading.load_model(model_dir, cfg.quant, device, progress=rank == 0, attn_implementation=attention,
                                     keep_on=keep_on)
    layer_cls = model_loading.decoder_layer_class(model)
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank: FSDP does not broadcast it
    targets = lora.parse_targets(cfg.lora_targets)
    # LoRA goes straight to the GPU even where the base waits in CPU memory: it is small (168M parameters for an 8B
    # model at r=64), its init there is one kernel per matrix instead of about a second of CPU time, and every world
    # size then draws the same A from the same generator. FSDP moves the CPU-resident rest unit by unit as it wraps.
    names = lora.inject_lora(model, targets, layer_cls, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, device)
    if adapter_dir is not None:  # resuming: the full weights go in before FSDP shards them
        lora.load_adapter(model, adapter_dir)
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ across ranks, as their data does
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"LoRA r={cfg.lora_rank} on {len(names)} layers: {n_lora / 1e6:.2f}M trainable parameters")
    compile = "inductor" if cfg.compile and device.type == "cuda" else None  # CPU (tests, gloo): eager
    return fsdp_wrap.wrap_model(model, layer_cls, device, cfg.sharding, cfg.cpu_offload, cfg.grad_checkpointing,
                                compile)


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of --lr at each step: linear warmup, then cosine or linear decay to 0, or constant."""
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:  # `step` counts steps done: step k = step + 1 trains at lr * k / (N + 1)
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[cfg.lr_schedule]
    return fn


# ----------------------------------------------------------------------------------------------------------------------
# One optimizer step


def n_targets(batch: dict) -> torch.Tensor:
    """Label tokens the loss counts: each predicts the token after it, so the first column never does."""
    return (batch["labels"][:, 1:] != data.IGNORE).sum()


def loss_sum(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy of every label token in the batch (fsdp_wrap.CausalLMWithLoss), and their count."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in
              ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
    return model(**inputs), n_targets(batch)


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
def evaluate(model, batches: list[dict], device: torch.device) -> float:
    """Mean loss over every label token of the eval set, on all ranks together."""
    model.eval()
    totals = torch.zeros(2, device=device)
    for batch in batches:
        loss, n = loss_sum(model, batch, device)
        totals += torch.stack([loss, n.float()])
    dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":  # reserved, not allocated: what the caching allocator holds is what can run out
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------------


def train(cfg: Config) -> list[dict]:
    """The whole run; returns the per-step metrics (also written to output_dir/metrics.jsonl)."""
    rank, local_rank, world, device = init_distributed(cfg.dist_timeout)
    stop, metrics_file, lock = checkpointing.StopOnSignal(), None, None
    try:
        out_dir = Path(cfg.output_dir)
        lock = checkpointing.lock_output_dir(out_dir)  # before anything in it is read or removed
        checkpointing.prepare_output_dir(out_dir, cfg.resume, cfg.overwrite)
        model_dir = model_loading.resolve_model_dir(cfg.model)
        config = model_loading.read_config(model_dir)  # an architecture transformers lacks fails before tokenizing

        # Data first: a bad dataset should fail in seconds, not after the model has loaded.
        tokenizer = model_loading.load_tokenizer(model_dir)
        train_ds, eval_ds = data.prepare(cfg, tokenizer, local_rank, log=print0)
        prompts = generate.load_prompts(cfg.sample_prompts, cfg.dataset)
        top_id, vocab = max(max(x) for x in train_ds["input_ids"]), config.vocab_size
        if top_id >= vocab:
            raise ValueError(f"the tokenizer in {model_dir} produced token id {top_id}, but the model has only {vocab} "
                             "embeddings: the tokenizer does not belong to this model")
        block_mask = data.packed_attention(device) == "sdpa"
        loader = data.build_loader(train_ds, cfg.batch_size, tokenizer.pad_token_id, rank, world, cfg.seed,
                                   cfg.group_by_length, block_mask)
        evals = None if eval_ds is None else data.eval_batches(eval_ds, cfg.batch_size, tokenizer.pad_token_id, rank,
                                                               world, block_mask)
        per_step = cfg.batch_size * cfg.grad_accum * world
        if len(loader) < cfg.grad_accum:
            raise ValueError(f"{len(train_ds)} rows cannot fill one step of {per_step} (batch_size {cfg.batch_size} "
                             f"x grad_accum {cfg.grad_accum} x {world} ranks): lower them or add data")
        steps_per_epoch = len(loader) // cfg.grad_accum
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        run = dict(world_size=world, steps_per_epoch=steps_per_epoch, base_model=cfg.model,
                   base_fingerprint=checkpointing.fingerprint(model_dir), data_fingerprint=data.fingerprint(train_ds),
                   config=dataclasses.asdict(cfg))
        resume_from = checkpointing.select_resume(cfg.resume, out_dir)
        resumed = checkpointing.read_state(resume_from) if resume_from else None
        if resumed:  # refused here, before the model loads
            checkpointing.check_resumable(resumed, resume_from, run)

        t0 = time.perf_counter()
        model = build_model(cfg, model_dir, device, rank, adapter_dir=resume_from)
        load_s = time.perf_counter() - t0
        print0(f"model loaded, adapted and sharded in {load_s:.1f}s")
        params = [p for p in model.parameters() if p.requires_grad]  # the LoRA flat parameters only
        # fused: one kernel for all LoRA tensors instead of several per tensor (CUDA only)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        step, epoch, skip = (resumed.step, resumed.epoch, resumed.step_in_epoch) if resumed else (0, 0, 0)
        if resumed:
            checkpointing.load_checkpoint(resume_from, model, optimizer, scheduler)
            print0(f"resumed from {resume_from}: step {step}, epoch {epoch}")
        print0(f"{len(train_ds)} rows, {per_step} per step, {total_steps} steps on {world} rank(s), {device.type}")

        # A checkpoint is good once the step after it had a finite loss: one saved after a step that blew the
        # weights up to huge but finite values is not (its next step is NaN), though nothing was skipped before it.
        history, bad_steps, last_saved, good, stopping = [], 0, resume_from, None, False
        bar = tqdm(total=total_steps, initial=step, desc="training", disable=rank != 0)
        metrics_file = checkpointing.open_metrics(out_dir / "metrics.jsonl", step) if rank == 0 else None
        model.train()
        while step < total_steps and not stopping:
            loader.sampler.set_epoch(epoch)  # an epoch's order is a function of (seed, epoch) alone
            batches = iter(loader)
            for _ in range(skip * cfg.grad_accum):  # resumed mid-epoch: pass the micro-batches already trained on
                next(batches)
            for in_epoch in range(skip, steps_per_epoch):
                if step >= total_steps:
                    break
                t0 = time.perf_counter()
                try:
                    m = train_step(model, optimizer, [next(batches) for _ in range(cfg.grad_accum)], cfg, device)
                except torch.cuda.OutOfMemoryError as e:
                    raise torch.cuda.OutOfMemoryError(
                        f"out of GPU memory in step {step + 1}: lower --batch_size (now {cfg.batch_size}; raise "
                        f"--grad_accum to keep the step size) or --seq_len (now {cfg.seq_len}), "
                        "or add --cpu_offload") from e
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                m.update(step=step, epoch=epoch, lr=lr, tokens_per_s=m["tokens"] / (time.perf_counter() - t0),
                         peak_mem_gib=peak_memory_gib(device))
                if evals and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                    m["eval_loss"] = evaluate(model, evals, device)
                if not history:
                    m["load_s"] = load_s
                history.append(m)
                if rank == 0:
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                    if step % cfg.log_every == 0 or step == total_steps:
                        bar.set_postfix_str(f"loss {m['loss']:.4f} lr {lr:.2e} gnorm {m['grad_norm']:.3f} "
                                            f"tok/s {m['tokens_per_s']:,.0f} mem {m['peak_mem_gib']:.2f}GiB"
                                            + (f" eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
                bar.update()
                bad_steps = bad_steps + 1 if m["skipped"] else 0
                good = good if m["skipped"] else last_saved
                if m["skipped"]:
                    print0(f"step {step}: loss {m['loss']}, grad norm {m['grad_norm']}: update skipped "
                           f"({bad_steps} in a row)")
                if cfg.max_bad_steps and bad_steps >= cfg.max_bad_steps:
                    raise RuntimeError(
                        f"{bad_steps} consecutive steps (up to step {step}) had a non-finite loss or grad norm; "
                        f"stopping. The last checkpoint whose next step was finite is {good or 'none'}: "
                        "check the data near these steps, or start again with a lower --lr")
                stopping = stop.agreed(device) and step < total_steps
                saving = bool(cfg.save_every) and step % cfg.save_every == 0
                if stopping or saving:
                    position = (epoch, in_epoch + 1) if in_epoch + 1 < steps_per_epoch else (epoch + 1, 0)
                    state = checkpointing.TrainerState(step, *position, **run)
                    last_saved = checkpointing.save_checkpoint(out_dir, state, model, optimizer, scheduler,
                                                               cfg.keep_last)
                if not stopping and step < total_steps and ("eval_loss" in m or saving):
                    generate.log_samples(model, tokenizer, prompts, out_dir / "samples.jsonl", step, device,
                                         cfg.sample_tokens)  # a collective: every rank samples, rank 0 writes
                if stopping:
                    print0(f"got {stop.signal or 'a signal on another rank'}: saved {last_saved}; continue with "
                           f"--resume auto")
                    break
            skip = 0
            epoch += 1
        bar.close()
        if not stopping and history and history[-1]["skipped"]:  # --max_bad_steps 0 ran on; the run still failed
            raise RuntimeError(f"the last step, {step}, had a non-finite loss or grad norm, so no adapter was saved. "
                               f"The last checkpoint whose next step was finite is {good or 'none'}; start again "
                               "with a lower --lr, or check the data")
        if not stopping:
            checkpointing.save_final(out_dir, model, dataclasses.asdict(cfg))
            generate.log_samples(model, tokenizer, prompts, out_dir / "samples.jsonl", step, device, cfg.sample_tokens)
            if history:  # empty when a finished run is resumed
                print0(f"done: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; adapter saved to {out_dir}")
        return history
    except RuntimeError as e:
        if isinstance(e, dist.DistError) or "gloo" in str(e):  # NCCL: DistError; gloo: a RuntimeError naming it
            print(f"rank {rank}: lost contact with another rank ({e}). The launcher's log names the rank that "
                  "failed; once it is back, continue with --resume auto.", flush=True)
        raise
    finally:
        if metrics_file:
            metrics_file.close()
        if lock:
            lock.close()  # releases the output_dir
        stop.restore()
        dist.destroy_process_group()


if __name__ == "__main__":
    train(parse_config())
    # Leave without the interpreter's teardown: gloo's worker threads can abort a finished process while Python
    # destroys the objects they still reference (pytorch/pytorch#179291). Everything is saved and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
