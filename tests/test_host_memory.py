"""Where the loaded model waits in host memory (--cpu_offload, several ranks, the CPU): its size there, estimated from
the safetensors headers, against what the node has; a node short of one copy per rank loads in turns, and one short
of even that is refused before anything loads."""
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, common, losses, run_torchrun
from safetensors.torch import load_file

import host_memory
import model_loading
import train
from model_loading import ModelFolderError, load_model
from quantization import is_4bit

GIB = r"[\d.,]+ GiB"


def one_copy(path: Path, quant: str = "nf4") -> int:
    return model_loading.host_bytes(model_loading.plan_load(path, quant))


def test_the_estimate_is_the_bytes_the_loaded_model_holds(checkpoints, prequantized):
    """From a 16-bit and from a pre-quantized checkpoint (within the quant_state's few JSON bytes per weight)."""
    for path, quant in [(checkpoints("llama"), "nf4"), (prequantized("nf4", True, torch.uint8), "auto")]:
        model = load_model(path, quant, "cpu", progress=False)
        held = sum(p.nbytes for p in model.parameters())
        for layer in (m for m in model.modules() if is_4bit(m)):
            state = layer.weight.quant_state
            held += state.absmax.nbytes + state.code.nbytes + state.state2.absmax.nbytes + state.state2.code.nbytes
        estimate = one_copy(path, quant)
        assert held <= estimate <= held + 14 * 200, (held, estimate)


@pytest.mark.parametrize("ranks, kept, copies, at_once", [
    (1, 1.0, 1.0, 1), (1, 1.0, 0.99, 0),  # one rank: its copy fits or not
    (2, 1.0, 2.0, 2), (2, 1.0, 1.99, 0),  # unsharded copies all stay
    (2, 0.0, 1.0, 1),  # sharded onto the GPU: a wrapped rank keeps nothing in host memory
    (2, 0.5, 1.5, 1), (2, 0.5, 1.49, 0),  # shards in host memory: one copy beside the other rank's half
    (8, 0.0, 3.5, 3), (8, 1 / 8, 3.5, 2),  # 2 copies + 6 eighths = 2.75; 3 copies + 5 eighths = 3.625 > 3.5
])
def test_ranks_load_as_many_at_once_as_their_copies_and_the_others_shares_fit(checkpoints, ranks, kept, copies,
                                                                               at_once):
    path = checkpoints("llama")
    one = one_copy(path)
    assert host_memory.copies_at_once(path, "nf4", ranks, kept, available=int(copies * one)) == (
        at_once, one, int(copies * one))


def test_the_refusals_name_why_and_both_figures(checkpoints, monkeypatch):
    path = checkpoints("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past "--cpu_offload needs a GPU"
    why = host_memory.held_in_host_memory(train.parse_config(["--cpu_offload"]), torch.device("cuda"))
    refusal = str(host_memory.host_memory_refusal(path, why, 3 * 2**30, 2**30))
    assert refusal == (f"--cpu_offload keeps the model in host memory: {path} needs about 3.0 GiB there as loaded "
                       "(estimated from its safetensors headers), and 1.0 GiB is available. Free host memory, or use a "
                       "machine with more, or train without --cpu_offload")
    why = "every rank loads the whole model into host memory before FSDP shards it"
    for in_turn, each in [(False, ", by each of the 2 ranks on this node: 6.0 GiB in all"),
                          (True, "; its 2 ranks load it one at a time, beside each other's shards")]:
        assert str(host_memory.host_memory_refusal(path, why, 3 * 2**30, 2**30, 2, in_turn)) == (
            f"{why}: {path} needs about 3.0 GiB there as loaded (estimated from its safetensors headers){each}, and "
            "1.0 GiB is available. Free host memory, run fewer ranks on this node (--nnodes spreads them over "
            "several), or use a machine with more")


@pytest.mark.parametrize("world, flags, device, held, at_once", [
    (1, [], "cuda", None, 1),  # straight to the GPU
    (1, [], "cpu", "on the CPU", 1),
    (1, ["--cpu_offload"], "cuda", "--cpu_offload", 1),
    (2, [], "cuda", "every rank loads the whole model", 1),  # in turn: a wrapped rank's shard is on the GPU
    (2, [], "cpu", "every rank loads the whole model", 0),  # 1 copy + the other's half > 1.25 copies
    (2, ["--cpu_offload"], "cuda", "--cpu_offload", 0),  # the same: the shards stay in host memory
    (2, ["--sharding", "no_shard"], "cuda", None, 2),  # each rank holds the whole model on its GPU: nothing to shard
    (2, ["--sharding", "hybrid_shard"], "cuda", "every rank loads the whole model", 0),  # never in turn
    (1, ["--show", "3"], "cpu", None, 1),  # loads no model
])
def test_the_model_is_checked_against_host_memory_exactly_where_the_loader_keeps_it_there(
        checkpoints, process_group, monkeypatch, world, flags, device, held, at_once):
    """On a node of `world` ranks with host memory for 1.25 copies of the loaded model, the runs whose model waits in
    host memory (and only those: the loader's keep_on follows the same held_in_host_memory) load as many ranks at
    once as fit, or are refused, before their data is tokenized."""
    path = checkpoints("llama")
    monkeypatch.setattr(train.dist, "get_world_size", lambda: world)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past "--cpu_offload needs a GPU"
    cfg = train.parse_config(["--model", str(path), *flags])
    reason = host_memory.held_in_host_memory(cfg, torch.device(device))
    assert (reason is None) == (held is None) and (held is None or reason.startswith(held))
    real = host_memory.copies_at_once
    monkeypatch.setattr(host_memory, "copies_at_once",
                        lambda *a, **k: real(*a, **k, available=int(1.25 * one_copy(path))))
    if not at_once:
        with pytest.raises(ModelFolderError, match=rf"^{reason}: .* needs about {GIB} there as loaded .* and {GIB} is "
                                                   "available"):
            host_memory.loaders_at_once(cfg, path, torch.device(device))
        return
    assert host_memory.loaders_at_once(cfg, path, torch.device(device)).at_once == at_once


def test_two_ranks_that_cannot_both_hold_the_model_load_in_turn_and_train_the_same(checkpoints, tmp_path):
    """Host memory for 1.75 copies, 2 ranks (on the CPU each keeps half a copy once wrapped; on a GPU, which they
    share where there is one, nothing): rank 1 loads once rank 0 has sharded its model, and the run's losses and
    adapter are those of the ranks loading at once (exactly on the CPU)."""
    shared = {"RANKS_SHARE_GPU": "1"} if torch.cuda.device_count() == 1 else {}
    same = dict(rtol=0, atol=0) if not torch.cuda.is_available() else dict(rtol=2e-2, atol=1e-3)
    path = checkpoints("llama")
    args = common(path, tmp_path / "turns", steps=3) + ["--batch_size", "4"]
    log = tmp_path / "builds.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(log),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **shared})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the 2 ranks of each node load the model 1 at a time" in proc.stdout
    builds = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda b: b["rank"])
    assert [b["rank"] for b in builds] == [0, 1] and builds[1]["start"] >= builds[0]["end"]
    in_turn = [json.loads(line) for line in (tmp_path / "turns" / "metrics.jsonl").read_text().splitlines()]
    args[args.index("--output_dir") + 1] = str(tmp_path / "at_once")
    at_once = run_torchrun(args, nproc=2, env=shared)
    assert len(in_turn) == 3
    torch.testing.assert_close(losses(in_turn), losses(at_once), **same)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("turns", "at_once"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **same)


@pytest.mark.parametrize("local_world, turns", [
    (None, host_memory.Turns(1, 1)),  # no LOCAL_WORLD_SIZE (a launcher other than torchrun, which init_distributed takes)
    ("2", host_memory.Turns(2, 1)), ("2", host_memory.Turns(1, 2)), ("3", host_memory.Turns(2, 2)),
    ("3", host_memory.Turns(1, 4)),  # a node of 3 ranks beside one of 4: the turns are counted from the larger
])
def test_every_rank_of_a_node_builds_once_and_passes_the_same_collectives(monkeypatch, local_world, turns):
    """Whatever the launcher's environment and however many load at once, each local rank builds its model exactly
    once, and every rank of every node ends the same number of turns (each a collective)."""
    ranks = int(local_world or 2)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    monkeypatch.setattr(train, "model_inputs", lambda *a: None)
    monkeypatch.setattr(train.fused, "check_loss", lambda *a: None)
    seen = []
    for local_rank in range(ranks):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        calls = {"builds": 0, "turns": 0}
        monkeypatch.setattr(train, "build_model", lambda *a, **k: calls.__setitem__("builds", calls["builds"] + 1))
        monkeypatch.setattr(host_memory, "stop_if_any_failed", lambda *a: calls.__setitem__("turns", calls["turns"] + 1))
        train.load_for_training(train.parse_config([]), Path("."), torch.device("cpu"), local_rank, None,
                                types.SimpleNamespace(probe=None), "llama", turns)
        seen.append(calls)
    assert all(c["builds"] == 1 for c in seen), seen
    assert {c["turns"] for c in seen} == {0 if turns.count == 1 else turns.count}, seen


@pytest.mark.parametrize("failing", [0, 1])
def test_a_refusal_in_one_ranks_turn_is_said_once_by_every_rank_without_a_traceback(checkpoints, tmp_path, failing):
    """Rank 0 (the first turn) or rank 1 (the second) refuses while loading, as on a damaged shard: every rank stops
    with that refusal, said once, the root cause in torchrun's summary, with no traceback of ours and no rank losing
    contact with the other."""
    line = "error: the shard model-00001.safetensors is damaged"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path / "builds.jsonl"), *common(checkpoints("llama"), tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FAIL_RANK": str(failing), "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.splitlines().count(line) == 1, out[-3000:]
    assert f"traceback : {line}" in out.split("Root Cause (first observed failure):")[1]
    assert f'File "{ROOT}' not in out and "lost contact" not in out


def rank_in_turn(log: str, args: list[str]) -> None:
    """One rank of the tests above: train.py with host memory for 1.75 copies, its build_model timed into `log`;
    with FAIL_RANK=r, rank r refuses in its build."""
    import cli

    real, build = host_memory.copies_at_once, train.build_model

    def tight(model_dir, quant, ranks=1, kept=1.0, available=None):
        return real(model_dir, quant, ranks, kept, available=int(1.75 * one_copy(model_dir, quant)))

    def timed(*a, **k):
        if os.environ.get("FAIL_RANK") == str(train.dist.get_rank()):
            raise cli.Refusal("the shard model-00001.safetensors is damaged")
        start = time.time()
        model = build(*a, **k)
        with open(log, "a") as f:
            f.write(json.dumps({"rank": train.dist.get_rank(), "start": start, "end": time.time()}) + "\n")
        return model

    host_memory.copies_at_once, train.build_model = tight, timed
    sys.argv[1:] = args
    return cli.main(train.parse_config, train.train)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    status = rank_in_turn(sys.argv[1], sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # gloo's threads and the interpreter's teardown (train.py says why)
