"""Training throughput and memory against the stack users would otherwise pick, measured in the same process.

    python benchmark.py                                    # Llama-3-8B shape, seq 2048, batch 1 and 8
    python benchmark.py --shape llama3-70b --layers 8 --batch_sizes 1 --max_memory_gib 24
    python benchmark.py --shape llama3-70b --prequantized --no_reference --batch_sizes 2,4 --max_memory_gib 24 \
        --extra="--cpu_offload --offload_activations"              # the whole 70B on one GPU in 24 GiB
    python benchmark.py --seq_lens 16384,32768 --batch_sizes 1 --max_memory_gib 24 --steps 5 --warmup 2 \
        --extra="--offload_activations --tiled_mlp 8192" --extra=   # long context: two variants of ours
    python benchmark.py --shape qwen3-30b-a3b --layers 8 --batch_sizes 1,4     # a mixture of experts
    python benchmark.py --shape llama3-70b --prequantized --no_reference --fake_world 2 --max_memory_gib 24
                                                             # one card of a two-card 70B run, on one GPU

Runs on a synthetic checkpoint with random weights in a real model's shape, written once and streamed through the
same loader as a real checkpoint. For each batch size it times
    ours        train.py's `train`, as users run it
    reference   transformers from_pretrained + BitsAndBytesConfig (nf4, bf16 compute and storage) + PEFT LoRA with
                the same r, alpha and targets, dropout 0.1, non-reentrant checkpointing, AdamW
    tuned       the same with dropout 0 and the adapters cast to bf16
On a mixture of experts (the MoE shapes) both adapt the experts too: ours with --lora_targets all-linear,experts
(the experts in NF4), the reference with PEFT's target_parameters on the experts' 3-D tensors, which transformers'
bitsandbytes quantization leaves in bf16, and with dropout 0, the only value PEFT accepts there; its memory and load
time include those bf16 experts. A --prequantized MoE checkpoint holds its experts in NF4 too (quantize.py
--quantize_experts: the full Qwen3-30B-A3B shape about a quarter of its bf16 size), which transformers cannot load:
with an MoE shape, --prequantized needs --no_reference. The 16-bit synthetic checkpoint is made in memory, by
write_random_checkpoint, with a copy of the experts: about twice its size (the full Mixtral-8x7B shape is 93 GB in
bf16; use --layers on one GPU).
All run on the same tokens, each in a fresh process of its own, one after the other; checks that the first-step
losses agree (same weights, same tokens, B = 0; on an MoE they differ by the experts' NF4 rounding too), and prints
a table: median tokens/s of the steps after the warmup ones; MFU = 6 x (linear-layer parameters, of an MoE's experts
those a token is routed to) x tokens/s / (bf16 matmul peak measured here), and beside it the MFU that also counts
attention's 12 x layers x heads x head_dim x seq FLOPs per token, as torchtitan and the PaLM paper count them (the whole
seq x seq score matrix, although causal attention computes half of it); peak GPU memory allocated and reserved; peak
host memory (RSS) of the process; load time from safetensors to ready. A stack that runs out of GPU memory becomes a
row saying so, with the memory it had reserved, and the benchmark goes on.
With --fake_world N, ours runs as rank 0 of N ranks on one GPU, its collectives moving no data (OneCardOfMany):
each tensor has its per-rank shape, so the peak memory and host RSS are one card's of an N-GPU run, and tokens/s is
that card's compute without communication.
"""
import argparse
import bisect
import gc
import itertools
import json
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

ORIGINAL_ALLOC_CONF = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")  # before train.py sets its default

import data  # noqa: E402
import lora  # noqa: E402
import moe_lora  # noqa: E402
import train  # noqa: E402
from builtin import make_tokenizer, write_random_checkpoint

SHAPES = {  # transformers config kwargs of real models
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0,
                       max_position_embeddings=32768),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5),
    # Mixtures of experts: transformers' Qwen3MoeConfig calls num_experts num_local_experts, as Mixtral does
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_local_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-5),
}


def synthetic_checkpoint(shape: str, layers: int, root: Path, prequantized: bool = False) -> Path:
    """Random weights in the shape of a real model, written once: as bf16 safetensors, or (prequantized) straight
    as the bitsandbytes NF4 checkpoint transformers writes, never bf16 on disk (70B: ~40 GB instead of 140 GB); of a
    mixture of experts, with the experts in NF4 too (quantize.py --quantize_experts), which only ours loads."""
    config = shape_config(shape, layers)
    moe = has_experts(config)
    # Its own folder name: a folder of an older benchmark, its experts in bf16, is not taken for it
    suffix = ("-nf4-experts" if moe else "-nf4") if prequantized else ""
    out = root / f"synthetic-{shape}-{config.num_hidden_layers}layers{suffix}"
    if not (out / "config.json").is_file():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if not prequantized:
            write_random_checkpoint(config, out, max_shard_size="5GB", tokenizer=make_tokenizer(), device=device)
            return out
        import model_loading
        import quantize

        skeleton = model_loading.build_skeleton(config, "none")

        def weights():  # as transformers initialises them: normal(0, initializer_range) matrices, norms of ones;
            for name, t in skeleton.state_dict().items():  # an MoE layer's experts fused, as write_4bit packs them
                yield name, (torch.randn(t.shape, device=device, dtype=torch.bfloat16) * config.initializer_range
                             if t.dim() > 1 else torch.ones(t.shape, device=device, dtype=torch.bfloat16))

        torch.manual_seed(0)
        quantize.write_4bit(config, weights(), out, "nf4", device, quantize_experts=True)
        make_tokenizer().save_pretrained(out)
    return out


def shape_config(shape: str, layers: int = 0):
    """The transformers config of SHAPES[shape], with `layers` decoder layers if given."""
    from transformers import AutoConfig

    kwargs = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def has_experts(config) -> bool:
    """Whether the model is a mixture of experts (experts' 3-D tensors in its decoder layers), seen on meta."""
    import model_loading

    skeleton = model_loading.build_skeleton(config, "none")
    return bool(moe_lora.expert_tensors(skeleton, model_loading.decoder_layer_class(skeleton)))


def lora_targets(config) -> str:
    """What both stacks adapt: every linear of the decoder layers, and on a mixture of experts the experts too."""
    return f"{lora.ALL_LINEAR},{lora.EXPERTS}" if has_experts(config) else lora.ALL_LINEAR


def reference_lora_targets(config) -> dict:
    """LoraConfig's targets that make PEFT adapt what train.py adapts (lora_targets): the linears by name (PEFT's own
    "all-linear" would also take an MoE's routers that are linears) and the experts' 3-D tensors as
    target_parameters, "experts.gate_up_proj", which PEFT matches as a suffix of each tensor's name."""
    selected = moe_lora.targets_on(config, lora_targets(config))
    linears = {name for name, module in selected.items() if hasattr(module, "in_features")}
    experts = sorted({".".join(name.split(".")[-2:]) for name in selected.keys() - linears})
    return dict(target_modules=lora.kinds(linears), **({"target_parameters": experts} if experts else {}))


def random_rows(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Completions of random text longer than seq_len tokens, after an empty prompt: truncation makes every row
    exactly seq_len tokens, all trained (the same targets as the reference's labels=input_ids)."""
    rng = random.Random(seed)
    return [{"prompt": "", "completion": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(2 * seq_len))}
            for _ in range(n)]


def linear_params(config) -> int:
    """Parameters in nn.Linear layers (lm_head included) and those of the experts a token is routed to: the N of 6N
    FLOPs per token. A mixture of experts' 3-D experts tensors count at num_experts_per_tok of their experts."""
    import model_loading

    skeleton = model_loading.build_skeleton(config, "none")
    linear = sum(m.weight.numel() for m in skeleton.modules() if isinstance(m, torch.nn.Linear))
    experts = moe_lora.expert_tensors(skeleton, model_loading.decoder_layer_class(skeleton))
    active = sum(math.prod(shape[1:]) * config.num_experts_per_tok for _, _, shape in experts.values())
    return linear + active


def matmul_peak_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def fresh_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def memory() -> tuple[float, float]:
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def host_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class OneCardOfMany(dist.ProcessGroup):
    """Rank 0 of a world of N in one process: every tensor has its per-rank shape, so memory is one card's of an
    N-GPU run, but no collective moves data. Gathers fill the other ranks' slots with zeros, not garbage: packed
    4-bit bytes read as a bf16 norm can be NaN, and a NaN loss fails the startup check and skips every step (no
    optimizer state would ever be allocated). Reductions leave this rank's own values."""

    def allgather(self, outputs, inputs, opts=None):  # FSDP1 on CPU tensors, and any other list gather
        for out, x in zip(outputs, inputs):
            for i, slot in enumerate(out):
                slot.copy_(x) if i == self.rank() else slot.zero_()
        return done()

    def all_gather_single(self, out, x, opts=None):  # FSDP1 on CUDA tensors (torch 2.13)
        out.zero_()
        out.view(-1)[:x.numel()].copy_(x.view(-1))  # rank 0's slot comes first
        return done()

    _allgather_base = all_gather_single  # the same, under the name of torch 2.11's all_gather_into_tensor

    def reduce_scatter_single(self, out, x, opts=None):
        out.view(-1).copy_(x.view(-1)[:out.numel()])
        return done()

    _reduce_scatter_base = reduce_scatter_single

    def allreduce(self, tensors, opts=None):
        return done()

    def broadcast(self, tensors, opts=None):
        return done()

    def barrier(self, opts=None):
        return done()


def done() -> dist.Work:
    future = torch.futures.Future()
    future.set_result(None)
    return _create_work_from_future(future)


dist.Backend.register_backend("one_card", lambda store, rank, world, timeout: OneCardOfMany(rank, world),
                              devices=["cpu", "cuda"])


def join_fake_world(n: int) -> None:
    """Make this process rank 0 of N (OneCardOfMany), as torchrun's environment says to train.py."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(n), LOCAL_WORLD_SIZE="1")
    dist.init_process_group("one_card", store=dist.HashStore(), rank=0, world_size=n)


def run_ours(model_dir: Path, data_file: Path, out: Path, seq: int, bs: int, extra: str, args) -> dict:
    from transformers import AutoConfig

    fresh_memory()
    if args.fake_world:  # train() keeps this group, and destroys it at its end
        join_fake_world(args.fake_world)
    flags = ["--model", str(model_dir), "--dataset", str(data_file), "--output_dir", str(out), "--seq_len",
             str(seq), "--batch_size", str(bs), "--max_steps", str(args.steps), "--lora_rank", str(args.r),
             "--lora_alpha", str(args.alpha), "--lr", "1e-4", "--overwrite",
             "--lora_targets", lora_targets(AutoConfig.from_pretrained(model_dir)), *extra.split()]
    flags += ["--use_dora"] * args.dora
    history = train.train(train.parse_config(flags))
    return dict(tps=statistics.median(h["tokens_per_s"] for h in history[args.warmup:]),
                first_loss=history[0]["loss"], load_s=history[0]["load_s"], mem=memory(), rss=host_rss_gib())


def run_reference(model_dir: Path, batches: list[torch.Tensor], tuned: bool, args) -> dict:
    """transformers + bitsandbytes + PEFT, the way their documentation trains QLoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    targets = reference_lora_targets(AutoConfig.from_pretrained(model_dir))
    dropout = 0.0 if tuned or "target_parameters" in targets else 0.1  # PEFT refuses dropout on experts' tensors
    fresh_memory()
    t0 = time.perf_counter()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing and PEFT its dropout
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=dropout,
                                             use_dora=args.dora, task_type="CAUSAL_LM", **targets))
    params = [p for p in model.parameters() if p.requires_grad]
    if tuned:
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    load_s = time.perf_counter() - t0
    tps, first_loss = [], None
    for ids in batches:
        ids = ids.cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = first_loss if first_loss is not None else loss.item()
        torch.cuda.synchronize()
        tps.append(ids.numel() / (time.perf_counter() - t0))
    return dict(tps=statistics.median(tps[args.warmup:]), first_loss=first_loss, load_s=load_s, mem=memory(),
                rss=host_rss_gib())


# GPU kernels by what they do, first match wins: a step's time split the way the optimizations in BENCHMARKS.md act.
KERNEL_KINDS = [
    ("4-bit (de)quantization", r"dequant|quantize"),
    ("attention", r"flash|fmha|attention"),
    ("matmuls (4-bit base, LoRA, lm_head)", r"gemm|gemv|cutlass|xmma|nvjet|matmul"),
    ("optimizer", r"adam|multi_tensor"),
    ("compiled elementwise (norms, rotary, SwiGLU, loss)", r"^triton"),
    ("copies and dtype casts", r"copy|Memcpy|Memset|CatArray|nccl"),
    ("cross-entropy", r"softmax|nll_loss"),
    ("other elementwise and reductions", r""),
]


def profile(model_dir: Path, data_file: Path, root: Path, batch_sizes: list[int], args) -> None:
    """Where a training step's GPU time goes, by kind of kernel, over the steps after the warmup (not the load, not
    the first steps, which compile); then the ops with the most GPU time; then the time the GPU had nothing to do,
    and what the CPU was doing meanwhile (idle_gpu)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    warmup, timed = args.warmup, args.steps - args.warmup
    prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    step, calls = train.train_step, [0]

    def profiled_step(*a, **k):  # train() looks train_step up at each call
        calls[0] += 1
        if calls[0] == warmup + 1:
            prof.start()
        out = step(*a, **k)
        if calls[0] == warmup + timed:
            torch.cuda.synchronize()
            prof.stop()
        return out

    train.train_step = profiled_step
    for bs in batch_sizes:
        calls[0] = 0
        result = run_ours(model_dir, data_file, root / f"out-bs{bs}", args.seq_lens[0], bs, args.extra[0], args)
        events = prof.key_averages()
        kinds = dict.fromkeys((kind for kind, _ in KERNEL_KINDS), 0.0)
        for e in prof.events():  # kernels only: CPU ops and the GPU ranges of annotations (FSDP's) would count twice
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
                kind = next(k for k, pattern in KERNEL_KINDS if re.search(pattern, e.name, re.IGNORECASE))
                kinds[kind] += e.self_device_time_total / 1e3 / timed  # ms per step
        total = sum(kinds.values())
        print(f"\n### batch {bs}: {result['tps']:,.0f} tokens/s; GPU kernel time per step, steps {warmup + 1}-"
              f"{args.steps}: {total:,.0f} ms")
        print("| kernels | ms per step | share |\n|---|---|---|")
        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"| {kind} | {ms:,.1f} | {ms / total:.1%} |")
        print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
        trace = root / f"trace-bs{bs}.json"
        prof.export_chrome_trace(str(trace))
        idle_gpu(json.loads(trace.read_text())["traceEvents"], timed)
        prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of what runs on the GPU
LAUNCHES = ("cuda_runtime", "cuda_driver")  # the CPU calls that queue that work (triton launches through the driver)
CPU_OPS = ("cpu_op", "user_annotation")  # what a CPU thread runs: aten ops, autograd nodes, record_function ranges


def idle_gpu(events: list[dict], steps: int) -> None:
    """When the GPU has nothing queued, what was the CPU thread doing that queued the next kernel? Each idle gap is
    charged to that thread's innermost op at each moment of the gap ("python" between ops: the interpreter itself),
    and to the outermost op or annotation around it (FSDP's forward, an autograd node in backward)."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    work = sorted((e for e in spans if e.get("cat") in GPU_WORK), key=lambda e: e["ts"])
    launch_of = {e["args"]["correlation"]: e for e in spans
                 if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})}
    gaps, busy_until = [], work[0]["ts"] + work[0]["dur"]
    for e in work[1:]:
        if e["ts"] > busy_until:
            gaps.append((busy_until, e["ts"], launch_of.get(e["args"].get("correlation"))))
        busy_until = max(busy_until, e["ts"] + e["dur"])
    threads = {}
    for e in spans:
        if e.get("cat") in CPU_OPS:
            threads.setdefault(e["tid"], []).append(e)
    timelines = {tid: _timeline(ops) for tid, ops in threads.items()}
    ends = {tid: [end for _, end, _, _ in segments] for tid, segments in timelines.items()}  # for bisect
    inner, outer, unlaunched = {}, {}, 0.0
    for start, end, launch in gaps:
        if launch is None or launch["ts"] < start:  # queued before the GPU went idle: a wait on something else
            unlaunched += end - start
            continue
        segments = timelines.get(launch["tid"], [])
        first = bisect.bisect_right(ends.get(launch["tid"], []), start)
        for s, e, name, top in itertools.takewhile(lambda seg: seg[0] < end, segments[first:]):
            overlap = min(e, end) - max(s, start)
            inner[name] = inner.get(name, 0.0) + overlap
            outer[top] = outer.get(top, 0.0) + overlap
    idle = sum(end - start for start, end, _ in gaps)
    step_ms = (busy_until - work[0]["ts"]) / 1e3 / steps
    print(f"\nGPU idle {idle / 1e3 / steps:,.1f} ms per step of {step_ms:,.1f} ({len(gaps) / steps:,.0f} gaps); "
          f"{unlaunched / 1e3 / steps:,.1f} ms of it with the next kernel already queued")
    for title, table in (("innermost CPU op during the idle time", inner), ("outermost", outer)):
        print(f"| {title} | ms per step |\n|---|---|")
        for name, us in sorted(table.items(), key=lambda kv: -kv[1])[:25]:
            print(f"| {name[:100]} | {us / 1e3 / steps:,.2f} |")


def _timeline(ops: list[dict]) -> list[tuple[float, float, str, str]]:
    """One thread's nested ops as consecutive (start, end, innermost, outermost) segments, in time order, from its
    first op's start to its last one's end; "python" where no op runs."""
    segments, stack, t = [], [], None  # stack: (end, name) of the ops open at t, outermost first
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])) + [{"ts": math.inf, "dur": 0, "name": ""}]:
        while stack and stack[-1][0] <= e["ts"]:  # ops ending before e starts close, innermost first
            end, name = stack.pop()
            segments.append((t, end, name, stack[0][1] if stack else name))
            t = end
        if stack:
            segments.append((t, e["ts"], stack[-1][1], stack[0][1]))
        elif t is not None:
            segments.append((t, e["ts"], "python", "python"))
        t = e["ts"]
        stack.append((e["ts"] + e["dur"], e["name"]))
    return segments[:-1]  # the last runs to the sentinel at infinity


STACKS = ("ours", "reference", "tuned")


def run_one(name: str, seq: int, bs: int, model_dir: Path, rows_text: list[dict], root: Path, args) -> dict:
    """One stack at one (seq, batch) in this process: its measurements, or {"oom": reserved GiB} if it ran out of GPU
    memory (a row of the table, not the end of the benchmark)."""
    try:
        if name.startswith("ours"):
            variant = int(name[len("ours"):] or 0)
            data_file = root / f"random-{seq}.jsonl"
            return run_ours(model_dir, data_file, root / f"out-{seq}-bs{bs}", seq, bs, args.extra[variant], args)
        return run_reference(model_dir, reference_batches(rows_text, seq, bs, args.steps), name == "tuned", args)
    except torch.OutOfMemoryError:  # train.py's own message adds advice; here the figure is what matters
        return {"oom": memory()[1], "rss": host_rss_gib()}


def reference_batches(rows_text: list[dict], seq: int, bs: int, steps: int) -> list[torch.Tensor]:
    """The token ids of ours' first `steps` batches, for the reference: the rows tokenized as train.py tokenizes them
    (data.prepare's tokenizer, its prompt format as train.py resolves it), in its DistributedSampler's epoch-0 order."""
    tok = make_tokenizer()
    data.drop_turn_opener_bos(tok)
    prompt_format = data.resolve_prompt_format("auto", tok)
    order = torch.randperm(len(rows_text), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [data.tokenize(rows_text[i], tok, seq, "prompt_completion", prompt_format)["input_ids"] for i in order]
    return [torch.tensor(ids[s * bs:(s + 1) * bs]) for s in range(steps)]


def attention_flops_per_token(model_dir: Path, seq: int) -> float:
    """12 x layers x heads x head_dim x seq: the score and value matmuls, forward and backward (torchtitan, PaLM)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 12 * config["num_hidden_layers"] * config["num_attention_heads"] * head_dim * seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="fewer decoder layers than the real model (0: all)")
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--seq_lens", default="2048", help="comma-separated sequence lengths, each a set of rows")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median (ours compiles)")
    p.add_argument("--r", type=int, default=64, help="LoRA rank (alpha 16, as in the QLoRA paper)")
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dora", action="store_true", help="DoRA in both stacks: ours --use_dora, PEFT's use_dora=True")
    p.add_argument("--no_reference", action="store_true", help="time ours only")
    p.add_argument("--prequantized", action="store_true",
                   help="write the synthetic checkpoint as NF4 (the bitsandbytes format transformers writes; of an "
                        "MoE shape, the experts in NF4 too, which needs --no_reference)")
    p.add_argument("--profile", action="store_true",
                   help="profile ours instead (the steps after the warmup): GPU time by kind of kernel, top ops, then "
                        "the idle GPU time by what the CPU was doing (the trace: trace-bs<N>.json in --workdir)")
    p.add_argument("--max_memory_gib", type=float, default=0,
                   help="cap each training process, e.g. 24 for a 24 GB card (not the one writing the checkpoint)")
    p.add_argument("--fake_world", type=int, default=0,
                   help="time ours as rank 0 of N ranks on this one GPU (OneCardOfMany): the memory of one card of an "
                        "N-GPU run; tokens/s without communication (needs --no_reference)")
    p.add_argument("--workdir", default="/tmp/fsdp_qlora_bench")
    p.add_argument("--extra", action="append",
                   help="more train.py flags for ours, e.g. '--grad_checkpointing none'; given several times, each "
                        "is a variant of ours with rows of its own")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one stack in this process
    p.add_argument("--one_batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one_seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.extra = args.extra or [""]
    args.seq_lens = [int(n) for n in args.seq_lens.split(",")]
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): no step would be timed")
    if args.prequantized and not args.no_reference and has_experts(shape_config(args.shape, args.layers)):
        raise SystemExit(f"--prequantized on the mixture of experts {args.shape} writes its experts in NF4, which "
                         "transformers' from_pretrained (the reference) cannot load: add --no_reference to time ours "
                         "alone, or drop --prequantized to compare both on a bf16 checkpoint")

    if args.fake_world and not args.no_reference:
        raise SystemExit(f"--fake_world {args.fake_world} times one rank of a sharded run, which the reference (one "
                         "process, unsharded) has no counterpart of: add --no_reference")

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = synthetic_checkpoint(args.shape, args.layers, root, args.prequantized)
    print(f"checkpoint ready in {time.perf_counter() - t0:.0f}s: {model_dir}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows_text = {}  # a child process needs its own length's rows only, and the parent has written the files
    for seq in [args.one_seq] if args.one else args.seq_lens:
        rows_text[seq] = random_rows(max(batch_sizes) * args.steps, seq)
        if not args.one:
            (root / f"random-{seq}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_text[seq]))
    n_linear = linear_params(shape_config(args.shape, args.layers))
    if args.max_memory_gib and (args.one or args.profile):  # a training process; the writer above is not capped
        torch.cuda.set_per_process_memory_fraction(args.max_memory_gib * 2**30 / torch.cuda.mem_get_info()[1])

    if args.profile:
        return profile(model_dir, root / f"random-{args.seq_lens[0]}.jsonl", root, batch_sizes, args)
    if args.one:  # a child process: one stack, one (seq, batch)
        result = run_one(args.one, args.one_seq, args.one_batch, model_dir, rows_text[args.one_seq], root, args)
        print("RESULT " + json.dumps(result))
        return

    def run_isolated(name: str, seq: int, bs: int) -> dict:
        """Each stack in a process of its own: no allocator state or leftover object biases the next one."""
        env = dict(os.environ)  # ours gets train.py's allocator setting, the reference the allocator as users have it
        if not name.startswith("ours"):
            env["PYTORCH_CUDA_ALLOC_CONF"] = ORIGINAL_ALLOC_CONF
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name, "--one_batch", str(bs),
                              "--one_seq", str(seq)], stdout=subprocess.PIPE, text=True, env=env)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{name} at seq {seq}, batch {bs} failed (exit {out.returncode}); its error is above")
        return json.loads(lines[-1][len("RESULT "):])

    peak = matmul_peak_tflops()
    torch.cuda.empty_cache()
    ours = [f"ours{i or ''}" for i in range(len(args.extra))]
    card = f" [1 card of {args.fake_world}, no communication]" if args.fake_world else ""
    label = {name: f"ours {args.extra[i]}".strip() + card for i, name in enumerate(ours)}
    rows = []
    for seq in args.seq_lens:
        attention = attention_flops_per_token(model_dir, seq)
        for bs in batch_sizes:
            results = {}
            # With DoRA, PEFT at its fastest only: dropout 0, as ours (PEFT's DoRA with dropout adds a matmul)
            references = [] if args.no_reference else ["tuned"] if args.dora else ["reference", "tuned"]
            for name in ours + references:
                results[name] = run_isolated(name, seq, bs)
                print(f"seq {seq} batch {bs} {label.get(name, name)}: " + json.dumps(results[name]), flush=True)
            done = {name: r for name, r in results.items() if "oom" not in r}
            for name, r in done.items():
                a, b = next(iter(done.values()))["first_loss"], r["first_loss"]
                if abs(a - b) > 2e-2 * abs(b):
                    raise SystemExit(f"first-step loss {a:.4f} != {b:.4f} ({name}): not comparing speeds")
            for name, r in results.items():
                if "oom" in r:
                    rows.append((seq, bs, label.get(name, name), None, r["oom"], r["rss"]))
                else:
                    ref = done.get("reference", done.get("tuned"))
                    rows.append((seq, bs, label.get(name, name), r["tps"], 6 * n_linear * r["tps"] / (peak * 1e12),
                                 (6 * n_linear + attention) * r["tps"] / (peak * 1e12), *r["mem"], r["rss"],
                                 r["load_s"], r["tps"] / ref["tps"] if ref else None, r["first_loss"]))
                print("RESULT " + json.dumps(rows[-1]), flush=True)  # kept even if a later run fails

    import bitsandbytes
    import transformers

    adapter = "DoRA" if args.dora else "LoRA"
    print(f"\n{args.shape} ({n_linear / 1e9:.2f}B in linear layers), {adapter} r={args.r} alpha={args.alpha:g}, "
          f"{args.steps} steps (median after {args.warmup}), {torch.cuda.get_device_name()}, {date.today()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, bf16 matmul peak {peak:.0f} TFLOP/s, "
          f"cap {args.max_memory_gib or 'none'} GiB")
    if args.fake_world:
        print(f"Rank 0 of a fake world of {args.fake_world} on this one GPU: memory and host RSS are one card's (one "
              f"rank's) of a {args.fake_world}-GPU run; tokens/s leaves out the all-gathers and reduce-scatters, which "
              "moved no data here, and NCCL's own buffers are not in the memory; the losses are meaningless")
    print("| seq | batch | stack | tokens/s | MFU (6N) | MFU (6N + attention) | peak alloc GiB | peak reserved GiB | "
          "host RSS GiB | load s | vs reference | step-1 loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seq, bs, name, tps, *rest in rows:
        if tps is None:
            reserved, rss = rest
            print(f"| {seq:,} | {bs} | {name} | out of memory at {reserved:.1f} GiB reserved | | | | "
                  f"| {rss:.1f} | | | |")
            continue
        mfu, mfu_attention, alloc, reserved, rss, load_s, ratio, loss = rest
        print(f"| {seq:,} | {bs} | {name} | {tps:,.0f} | {mfu:.1%} | {mfu_attention:.1%} | {alloc:.1f} | "
              f"{reserved:.1f} | {rss:.1f} | {load_s:.1f} | {f'{ratio:.2f}x' if ratio else ''} | {loss:.4f} |")


if __name__ == "__main__":
    main()
