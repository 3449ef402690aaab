"""Training throughput and memory on a synthetic checkpoint with the shape of a real model (random weights).

    python benchmark.py                                   # Llama-3-8B shape, seq 2048, batch 1 and 8, 20 steps each
    python benchmark.py --shape llama3-8b --batch_sizes 1 --steps 10

The checkpoint is written once (about 16 GB for 8B) and streamed through the same loader as a real model. Each batch
size is a full run of train.py's `train`; the table gives the median tokens/s of the steps after the first three,
MFU = 6 * (linear-layer parameters) * tokens/s / (measured bf16 matmul peak), and peak reserved GPU memory.
"""
import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

import train
from data import builtin_tokenizer
from model_loading import write_random_checkpoint

SHAPES = {  # transformers config kwargs of real models
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama3-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def synthetic_checkpoint(shape: str, root: Path) -> Path:
    from transformers import AutoConfig

    out = root / f"synthetic-{shape}"
    if not (out / "config.json").is_file():
        kwargs = dict(SHAPES[shape])
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        write_random_checkpoint(config, out, max_shard_size="5GB", tokenizer=builtin_tokenizer(), device=device)
    return out


def random_text_dataset(path: Path, n: int, chars: int, seed: int = 0) -> Path:
    """Plain-text rows longer than seq_len: every row is truncated to exactly seq_len tokens, every token trained."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(chars))}) + "\n")
    return path


def linear_params(model_dir: Path) -> int:
    """Parameters in nn.Linear layers (lm_head included): the 6*N of the MFU numerator."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/fsdp_qlora_bench")
    p.add_argument("--extra", default="", help="more train.py flags, e.g. '--quant none --lora_rank 64'")
    args = p.parse_args()

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = synthetic_checkpoint(args.shape, root)
    print(f"checkpoint ready in {time.perf_counter() - t0:.0f}s: {model_dir}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    data_file = random_text_dataset(root / "random.jsonl", max(batch_sizes) * args.steps, args.seq_len + 16)
    n_linear = linear_params(model_dir)
    peak = matmul_peak_tflops() if torch.cuda.is_available() else float("nan")

    rows = []
    for bs in batch_sizes:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        flags = ["--model", str(model_dir), "--dataset", str(data_file), "--output_dir", str(root / f"out-bs{bs}"),
                 "--seq_len", str(args.seq_len), "--batch_size", str(bs), "--max_steps", str(args.steps),
                 "--log_every", "1", *args.extra.split()]
        history = train.train(train.parse_config(flags))
        tps = statistics.median(h["tokens_per_s"] for h in history[3:])
        rows.append((bs, tps, 6 * n_linear * tps / (peak * 1e12), max(h["peak_mem_gib"] for h in history)))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import bitsandbytes
    import transformers

    print(f"\n{args.shape}, seq {args.seq_len}, {args.steps} steps, {device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"bf16 matmul peak {peak:.0f} TFLOP/s, flags: {args.extra or 'defaults'}")
    print("| batch | tokens/s | MFU | peak reserved GiB |\n|---|---|---|---|")
    for bs, tps, mfu, mem in rows:
        print(f"| {bs} | {tps:,.0f} | {mfu:.1%} | {mem:.1f} |")


if __name__ == "__main__":
    main()
