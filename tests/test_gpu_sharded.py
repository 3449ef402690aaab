"""The sharded CUDA path: 2 ranks, each checked against 1 rank. On one GPU they share it through gloo
(RANKS_SHARE_GPU=1: real numerics, NCCL aside; slow, so a few steps each); on two or more they take one each and
talk through NCCL (tests/two_gpus.sh). Skipped without CUDA."""
import os
import sys
from pathlib import Path

import pytest
import torch

if __name__ != "__main__":  # run as a script, it is a rank of test_packed_bytes_survive_wrapping_and_steps
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the sharded CUDA path needs a GPU")

from conftest import adapted_4bit, common, losses, run_inprocess, run_torchrun  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import fsdp_wrap  # noqa: E402
import train  # noqa: E402
from model_loading import quantized_weights  # noqa: E402

SHARED = {} if torch.cuda.device_count() >= 2 else {"RANKS_SHARE_GPU": "1"}  # NCCL where there are two GPUs
BF16 = 2e-2  # relative: the GPU's bf16 kernels round differently at other batch shapes and sharded reductions


def two_ranks_and_one(path: Path, out: Path, *extra: str, two_only: tuple[str, ...] = ()) -> tuple[list, list]:
    """4 steps on 2 ranks sharing GPU 0 at batch 4 (with `two_only` too), and in this process on 1 rank at batch 8:
    the same examples in each step, and the same adapter within bf16 rounding. Eager (--no-compile): quicker here."""
    two = run_torchrun(common(path, out / "two", steps=4) + ["--batch_size", "4", "--no-compile", *extra, *two_only],
                       nproc=2, env=SHARED)
    one = run_inprocess(common(path, out / "one", steps=4) + ["--batch_size", "8", "--no-compile", *extra])
    assert [h["tokens"] for h in one] == [h["tokens"] for h in two]
    a, b = (load_file(out / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() / torch.cat([a[k].flatten() for k in a]).norm()
    assert diff < BF16, diff
    return two, one


def same_steps(two: list[dict], one: list[dict]) -> None:
    torch.testing.assert_close(losses(two), losses(one), rtol=BF16, atol=0)
    torch.testing.assert_close([h["grad_norm"] for h in two], [h["grad_norm"] for h in one], rtol=5 * BF16, atol=0)
    assert losses(one)[-1] < losses(one)[0]


@pytest.mark.parametrize("base", ["nf4", "prequantized"])
def test_two_ranks_sharing_a_gpu_give_one_ranks_losses_grad_norms_and_adapter(checkpoints, prequantized, tmp_path,
                                                                              base):
    """2 ranks on GPU 0 (batch 4) give 1 rank's (batch 8) losses and grad norms, and its adapter, within bf16."""
    path = checkpoints("llama") if base == "nf4" else prequantized()
    same_steps(*two_ranks_and_one(path, tmp_path))


def test_cpu_offload_on_two_ranks_gives_resident_losses(checkpoints, tmp_path):
    """FSDP's CPUOffload on 2 ranks sharing GPU 0 gives the losses, grad norms and adapter of 1 resident rank."""
    same_steps(*two_ranks_and_one(checkpoints("llama"), tmp_path, two_only=("--cpu_offload",)))


def test_moe_with_lora_on_its_experts_on_two_ranks(checkpoints, tmp_path):
    """Mixtral with LoRA on its 4-bit experts: 2 ranks sharing GPU 0 give 1 rank's losses, grad norms and adapter."""
    same_steps(*two_ranks_and_one(checkpoints("mixtral"), tmp_path, "--lora_targets", "all-linear,experts"))


def test_sigkill_then_resume_auto_on_two_ranks_sharing_a_gpu(checkpoints, tmp_path, monkeypatch):
    """Both ranks SIGKILLed mid-run, then relaunched with --resume auto: the later steps' losses and grad norms are
    the uninterrupted run's."""
    from test_checkpointing import killed_after_a_checkpoint

    for key, value in SHARED.items():  # for every launch below
        monkeypatch.setenv(key, value)
    args = common(checkpoints("llama"), tmp_path / "ref", steps=8) + ["--batch_size", "2", "--no-compile"]
    ref = run_torchrun(args, nproc=2)
    out = tmp_path / "killed"
    args[args.index("--output_dir") + 1] = str(out)
    args += ["--save_every", "2", "--resume", "auto"]  # the same command for launch and relaunch
    k = killed_after_a_checkpoint(args, out, tmp_path / "killed.log", timeout=300)
    assert 0 < k < 8
    resumed = run_torchrun(args, nproc=2)
    assert [h["step"] for h in resumed] == list(range(1, 9))
    torch.testing.assert_close(losses(resumed)[k:], losses(ref)[k:], rtol=BF16, atol=0)
    torch.testing.assert_close([h["grad_norm"] for h in resumed][k:], [h["grad_norm"] for h in ref][k:],
                               rtol=5 * BF16, atol=0)


def test_packed_bytes_survive_wrapping_and_steps(checkpoints, tmp_path):
    """Every 4-bit weight's packed bytes, gathered from 2 ranks sharing GPU 0, are the loaded bytes exactly, after
    wrapping and after 3 optimizer steps (FSDP2 rewrites bf16 NaN patterns in them: bitsandbytes#1945)."""
    import subprocess

    report = tmp_path / "report.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(checkpoints("llama")), str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **SHARED})
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights, nan_patterns, after_wrapping, after_steps = map(int, report.read_text().split())
    assert (weights, after_wrapping, after_steps) == (14, 0, 0)  # 2 layers of 7 linears
    assert nan_patterns > 0  # bytes that read as a bf16 NaN are among them, and survive too


def packed_bytes_rank(model_dir: str, report: str) -> None:
    """One rank of test_packed_bytes_survive_wrapping_and_steps."""
    rank, _, _, device = train.init_distributed(120)
    torch.manual_seed(0)
    model, layer_cls = adapted_4bit(Path(model_dir), keep_on=torch.device("cpu"))
    names = sorted(quantized_weights(model))
    loaded = {n: model.get_parameter(n).detach().view(torch.int16).clone().cpu() for n in names}
    nan_patterns = sum(int(torch.isnan(b.view(torch.bfloat16)).sum()) for b in loaded.values())
    model = fsdp_wrap.wrap_model(model, layer_cls, device)
    after_wrapping = changed(model, loaded)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = torch.randint(4, 400, (2, 40), device=device)
        model(input_ids=ids, labels=ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    after_steps = changed(model, loaded)
    if rank == 0:
        Path(report).write_text(f"{len(loaded)} {nan_patterns} {after_wrapping} {after_steps}")
    torch.distributed.destroy_process_group()


def changed(model, loaded: dict[str, torch.Tensor]) -> int:
    """How many of the loaded 4-bit weights differ, in any bit, from the whole weight FSDP gathers now."""
    with fsdp_wrap.FSDP.summon_full_params(model, writeback=False):
        # names as in the unwrapped model: CausalLMWithLoss holds it as `model`
        params = {fsdp_wrap.clean_name(n).removeprefix("model."): p for n, p in model.named_parameters()}
        return sum(not torch.equal(params[n].detach().view(torch.int16).cpu(), b) for n, b in loaded.items())


if __name__ == "__main__":
    packed_bytes_rank(*sys.argv[1:3])
    sys.stdout.flush()
    os._exit(0)  # gloo's threads and the interpreter's teardown (train.py says why)
