"""benchmark.py --profile's account of the idle GPU, on a hand-made trace, and the fake world of --fake_world: the timed
runs themselves need a GPU."""
import math

import torch
import torch.distributed as dist
from conftest import DEVICE, adapted_4bit
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

import benchmark
import fsdp_wrap


def span(cat, name, ms, dur, tid, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ms * 1000, "dur": dur * 1000, "tid": tid}  # traces count us
    return event | ({"args": {"correlation": correlation}} if correlation is not None else {})


def test_idle_gpu_is_charged_to_what_the_launching_thread_was_doing(capsys):
    """The GPU idles from 40 to 80 ms (between two kernels) and from 95 to 100. The first gap: the thread that
    launches the second kernel spends 40-60 in its outer op and 60-80 in aten::add, which launches it; another
    thread's work at that time is not charged. The second gap: the kernel was queued at 50, before the GPU went
    idle, so the CPU is not the reason."""
    events = [
        span("cpu_op", "outer", 0, 100, tid=1),
        span("cpu_op", "aten::mm", 10, 20, tid=1),
        span("cuda_runtime", "cudaLaunchKernel", 25, 2, tid=1, correlation=1),
        span("cuda_runtime", "cudaLaunchKernel", 50, 2, tid=1, correlation=3),
        span("cpu_op", "aten::add", 60, 20, tid=1),
        span("cuda_runtime", "cudaLaunchKernel", 75, 2, tid=1, correlation=2),
        span("cpu_op", "aten::other_thread", 40, 40, tid=2),
        span("kernel", "k1", 30, 10, tid=7, correlation=1),
        span("kernel", "k2", 80, 15, tid=7, correlation=2),
        span("kernel", "k3", 100, 10, tid=7, correlation=3),
    ]
    benchmark.idle_gpu(events, steps=1)
    out = capsys.readouterr().out
    assert "GPU idle 45.0 ms per step of 80.0 (2 gaps); 5.0 ms of it with the next kernel already queued" in out
    inner, outer = out.split("| outermost |")
    assert rows(inner) == {"outer": 20.0, "aten::add": 20.0}
    assert rows(outer) == {"outer": 40.0}


def rows(table: str) -> dict[str, float]:
    cells = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {name.strip(): float(ms) for name, ms in cells if "ms per step" not in ms and "CPU op" not in name}


def test_rank_0_of_a_fake_world_of_2_holds_half_of_every_unit_with_finite_numbers(checkpoints, monkeypatch):
    """As rank 0 of a fake world of 2, every FSDP unit holds half of its flat parameter (rounded up), and the gathered
    weights are finite: the loss and every LoRA gradient of a step are finite numbers."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "0")  # join_fake_world sets them as torchrun would; restored after the test
    benchmark.join_fake_world(2)
    try:
        model, layer_cls = adapted_4bit(checkpoints("llama"), keep_on=torch.device("cpu"))
        model = fsdp_wrap.wrap_model(model, layer_cls, DEVICE)
        flat = [unit._handle.flat_param for unit in FSDP.fsdp_modules(model) if unit._handle is not None]
        assert len(flat) == 5  # the root, and per decoder layer its frozen weights and its LoRA weights
        assert [p.numel() for p in flat] == [math.ceil(p._unpadded_unsharded_size.numel() / 2) for p in flat]
        ids = torch.randint(4, 400, (2, 40), device=DEVICE)
        loss = model(input_ids=ids, labels=ids)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        assert math.isfinite(loss.item()) and grads.numel() == sum(p.numel() for p in flat[1:] if p.requires_grad)
        assert torch.isfinite(grads).all()
    finally:
        dist.destroy_process_group()


def test_the_reference_trains_on_our_first_batches(tmp_path, monkeypatch):
    """The reference stack's batches are the token ids of train.py's first batches on the same rows file, in the same
    order: the two stacks' step-1 losses, which the benchmark compares before any speed, are of the same tokens."""
    import json

    from builtin import make_tokenizer

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # restored after the test: init_distributed writes them
        monkeypatch.delenv(name)
    rows = benchmark.random_rows(8, 64)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = benchmark.train.parse_config(["--dataset", str(tmp_path / "rows.jsonl"), "--seq_len", "64",
                                        "--batch_size", "2", "--output_dir", str(tmp_path / "out")])
    benchmark.train.init_distributed(60)
    try:
        ours = benchmark.train.prepare_batches(cfg, make_tokenizer(), 10**6, torch.device("cpu")).loader
        ours = [batch["input_ids"] for batch, _ in zip(ours, range(3))]
    finally:
        dist.destroy_process_group()
    reference = benchmark.reference_batches(rows, 64, 2, 3)
    assert [r.tolist() for r in reference] == [o.tolist() for o in ours]
    assert all(r.shape == (2, 64) for r in reference)
