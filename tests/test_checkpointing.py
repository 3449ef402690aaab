"""Checkpoints: a resumed run continues bit for bit, and no crash, signal, bad step or bad save loses a good one."""
import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (DEVICE, LLAMA_LINEARS, ROOT, losses, refused_before_loading, run_inprocess, run_torchrun,
                      small_disk, tiny_config)
from safetensors.torch import load_file

import checkpointing
import data
import lora
import run_folder
import train
from builtin import make_tokenizer
from checkpointing import ResumeError, damage, list_checkpoints, read_state


@pytest.fixture(scope="module")
def small_run(checkpoints, tmp_path_factory):
    """Flags of a short run on 12 examples: with batch 2, an epoch is 3 steps on 2 ranks and 6 on one, so resumes
    land mid-epoch and on epoch boundaries. Dropout is on, so the RNG states matter."""
    data_file = tmp_path_factory.mktemp("data") / "d.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": "Say the word.", "input": w, "output": w}) + "\n"
                                 for w in "red blue green black white one two three four five cat dog".split()))

    def args(out: Path, steps: int, *extra: str) -> list[str]:
        return ["--model", str(checkpoints("llama")), "--dataset", str(data_file), "--output_dir", str(out),
                "--max_steps", str(steps), "--seq_len", "64", "--batch_size", "2", "--lora_rank", "4",
                "--lora_alpha", "8", "--lora_dropout", "0.1", "--lr", "1e-2", "--warmup_steps", "2", *extra]
    args.data_file = data_file
    return args


def launch(args: list[str], log: Path, script: Path = ROOT / "train.py") -> subprocess.Popen:
    """2-rank torchrun of `script` in the background, its output in `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"})


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of each process torchrun started (children of the launcher, found through /proc)."""
    pids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher.pid:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                pids[int(next(e for e in env if e.startswith(b"RANK="))[5:])] = int(stat.parent.name)
        except (OSError, StopIteration, ValueError, IndexError):
            pass
    return pids


def slow_tokenizing(folder: Path, seconds: float) -> Path:
    """A script that runs train.py with its flags, where rank 0 takes `seconds` longer to tokenize; it creates
    folder/tokenizing as it starts."""
    script = folder / "slow_tokenizing.py"
    script.write_text(f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
import data, train
real = data.tokenize_batch

def tokenize_batch(*args, **kwargs):
    open({str(folder / "tokenizing")!r}, "w").close()
    time.sleep({seconds})
    return real(*args, **kwargs)

if os.environ["LOCAL_RANK"] == "0":  # the rank that tokenizes while the others wait
    data.tokenize_batch = tokenize_batch
train.train(train.parse_config())
os._exit(0)
""")
    return script


def wait_until(condition, launcher: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert launcher.poll() is None, "the run ended before the test could interrupt it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def killed_after_a_checkpoint(args: list[str], out: Path, log: Path, timeout: float = 120) -> int:
    """Launch `args` on 2 ranks, SIGKILL both once `out` holds a checkpoint; the step of the newest one."""
    proc = launch(args, log)
    wait_until(lambda: list_checkpoints(out), proc, timeout)
    for pid in worker_pids(proc).values():
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    return read_state(list_checkpoints(out)[-1]).step


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_sigkill_then_resume_auto_continues_bit_for_bit(small_run, tmp_path):
    """Both ranks SIGKILLed mid-run, then relaunched with --resume auto: steps k+1..n have the uninterrupted run's
    losses, grad norms and final adapter exactly (same data order, dropout RNG, AdamW moments and LR schedule)."""
    ref = run_torchrun(small_run(tmp_path / "ref", 10), nproc=2)
    out = tmp_path / "killed"
    args = small_run(out, 10, "--save_every", "2", "--resume", "auto")  # the same command for launch and relaunch
    k = killed_after_a_checkpoint(args, out, tmp_path / "killed.log")
    assert 0 < k < 10

    resumed = run_torchrun(args, nproc=2)
    assert [h["step"] for h in resumed] == list(range(1, 11))
    assert losses(resumed) == losses(ref)  # == on floats: bit for bit
    assert [h["grad_norm"] for h in resumed] == [h["grad_norm"] for h in ref]
    a, b = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_damaged_newest_checkpoint_falls_back_to_previous(small_run, tmp_path, capsys):
    """A damaged newest checkpoint and a half-written one are passed over, with a warning; the run continues from
    the one before, exactly. (Batch 4 on one rank: 3 steps an epoch, so checkpoint-3 sits on an epoch boundary.)"""
    out = tmp_path / "run"
    first = run_inprocess(small_run(out, 7, "--save_every", "3", "--batch_size", "4"))
    interrupted = out / "checkpoint-9.tmp-abc"  # what a save killed midway leaves
    interrupted.mkdir()
    (interrupted / "optimizer.pt").write_bytes(b"half")
    optimizer_file = out / "checkpoint-6" / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])

    again = run_inprocess(small_run(out, 7, "--save_every", "3", "--batch_size", "4", "--resume", "auto"))
    printed = capsys.readouterr().out
    assert "cannot resume from" in printed and "checkpoint-6: optimizer.pt has 100 bytes" in printed
    assert [h["step"] for h in again] == [4, 5, 6, 7] and [h["epoch"] for h in again] == [1, 1, 1, 2]
    assert losses(again) == losses(first)[3:]  # == on floats: bit for bit
    assert not interrupted.exists() and damage(out / "checkpoint-6") is None  # cleaned up, and saved anew


def test_failed_save_keeps_previous_checkpoint(small_run, tmp_path, monkeypatch):
    """A disk that fills up in the middle of a save: a clear error, and the previous checkpoint intact."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="checkpoint-4 failed.*no space left on device.*earlier checkpoints are intact"):
        run_inprocess(small_run(out, 6, "--save_every", "2"))
    assert list_checkpoints(out) == [out / "checkpoint-2"] and damage(out / "checkpoint-2") is None
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # no half-written folder left


def test_full_disk_says_so_with_the_path(small_run, tmp_path):
    """A real full disk (a 96 KiB tmpfs) in a checkpoint save: "no space left on device" with the folder, not torch's
    "unexpected pos", and no half-written checkpoint left."""
    with small_disk(tmp_path / "disk", "96k") as disk:
        with pytest.raises(OSError, match=rf"saving {disk}/run/checkpoint-2 failed \(no space left on device: "
                                          rf"[\d.]+ MiB free in {disk}/run"):
            run_inprocess(small_run(disk / "run", 2, "--save_every", "2"))
        assert list_checkpoints(disk / "run") == [] and not list((disk / "run").glob("*tmp*"))


def metrics_disk_full_at(step: int):
    """run_folder.open_metrics whose file takes 20 bytes of step `step`'s line, then fails as a full disk does."""
    real_open = run_folder.open_metrics

    def open_metrics(path, resumed_step):
        file = real_open(path, resumed_step)
        write = file.write

        def fill_up(line):
            if json.loads(line)["step"] == step:
                write(line[:20])
                file.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(line)

        file.write = fill_up
        return file

    return open_metrics


def test_full_disk_while_logging_a_step_saves_and_stops(small_run, tmp_path, monkeypatch):
    """(17) metrics.jsonl's write fails at step 3 (no space left on device, half the line written): the run saves
    checkpoint-3 and stops with one error naming the folder; the file holds steps 1-3 whole, and --resume auto
    continues with each step once."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(run_folder, "open_metrics", metrics_disk_full_at(3))
        with pytest.raises(OSError, match=rf"^writing {out}/metrics.jsonl failed at step 3 \(no space left on device: "
                                          rf"[\d.]+ MiB free in {out}; free some space\); saved {out}/checkpoint-3: "
                                          "continue with --resume auto$") as failed:
            run_inprocess(small_run(out, 4, "--save_every", "4"))
    assert failed.value.__context__ is None or failed.value.__suppress_context__  # one traceback, not three
    assert list_checkpoints(out) == [out / "checkpoint-3"] and [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert [h["step"] for h in run_inprocess(small_run(out, 4, "--save_every", "4", "--resume", "auto"))] == [4]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_full_disk_while_logging_with_no_checkpoint_says_what_failed_first(small_run, tmp_path, monkeypatch):
    """(5) With --save_every 0, metrics.jsonl's write fails at step 3 and the checkpoint saved then fails too: one
    error names metrics.jsonl at step 3 first, then the checkpoint that could not be saved either, and that no
    checkpoint exists; with an earlier checkpoint, it names that one."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-3" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    full = r"\(no space left on device: [\d.]+ MiB free in {out}; free some space\)"
    for flags, left in [(("--save_every", "0"), "no earlier checkpoint exists"),
                        (("--save_every", "2"), r"the earlier checkpoints are intact \(newest: checkpoint-2\)")]:
        out = tmp_path / f"run{flags[1]}"
        with monkeypatch.context() as m:
            m.setattr(run_folder, "open_metrics", metrics_disk_full_at(3))
            m.setattr(torch, "save", save)
            with pytest.raises(OSError, match=rf"^writing {out}/metrics.jsonl failed at step 3 {full.format(out=out)}; "
                                              rf"the checkpoint could not be saved either: saving {out}/checkpoint-3 "
                                              rf"failed {full.format(out=out)}; {left}$") as failed:
                run_inprocess(small_run(out, 4, *flags))
        assert failed.value.__context__ is None or failed.value.__suppress_context__
        assert [p.name for p in list_checkpoints(out)] == (["checkpoint-2"] if flags[1] == "2" else [])
        assert not list(out.glob("*.tmp-*")) and [m["step"] for m in metrics(out)] == [1, 2]


def test_resumed_run_has_each_sample_once(small_run, tmp_path):
    """(32) Killed after checkpoint-4 and resumed with --resume auto: samples.jsonl is cut back to the checkpoint's
    step, as metrics.jsonl is, and reads as the uninterrupted run's, each step's samples once."""
    out, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("red\nblue\n")
    flags = ("--save_every", "2", "--sample_prompts", str(prompts), "--sample_tokens", "2")
    run_inprocess(small_run(out, 6, *flags))
    uninterrupted = (out / "samples.jsonl").read_text()
    assert [json.loads(line)["step"] for line in uninterrupted.splitlines()] == [2, 2, 4, 4, 6, 6]
    shutil.rmtree(out / "checkpoint-6")  # as if killed after step 6's samples, before the run ended
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.json"):
        (out / name).unlink()
    run_inprocess(small_run(out, 6, *flags, "--resume", "auto"))
    assert (out / "samples.jsonl").read_text() == uninterrupted


def test_run_folder_files_are_readable_by_other_users(tmp_path):
    """(33) The final adapter's files, and a checkpoint folder with all it holds, get the mode of any new file (0644,
    and 0755 for the folder, under umask 022), not the private 0600 and 0700 of safetensors' and mkdtemp's temporary
    files: a server running as another user (a vLLM container) can read them."""
    adapter = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
               "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    config = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "model": "tiny"}
    tokenizer = make_tokenizer()
    tokenizer.chat_template = data.CHATML
    umask = os.umask(0o022)
    try:
        run_folder.write_final(tmp_path, adapter, config, "0" * 16, tokenizer)
        run_folder.write_checkpoint(tmp_path / "checkpoint-1", 1, adapter, config, "0" * 16, tokenizer, {})
    finally:
        os.umask(umask)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    names = ["adapter_config.json", "adapter_model.safetensors", "train_config.json", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja"]
    assert modes == {**dict.fromkeys(names + [f"checkpoint-1/{n}" for n in names + ["COMPLETE"]], 0o644),
                     "checkpoint-1": 0o755}


def test_keep_last(small_run, tmp_path):
    out = tmp_path / "run"
    run_inprocess(small_run(out, 4, "--save_every", "1", "--keep_last", "2"))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]


def test_optimizer_state_is_keyed_like_the_adapter(small_run, tmp_path):
    """optimizer.pt names each LoRA weight by its path in the model, as the adapter file does, not by where FSDP
    grouping puts it: a checkpoint does not depend on the wrapping, and one written with another grouping resumes."""
    out = tmp_path / "run"
    run_inprocess(small_run(out, 1, "--save_every", "1"))
    optim = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)
    adapter = {k.removeprefix("base_model.") for k in load_file(out / "checkpoint-1" / "adapter_model.safetensors")}
    assert set(optim["state"]) == set(optim["param_groups"][0]["params"]) == adapter  # "model.model.layers.0...."


# ---------------------------------------------------------------------------------------------------------------------
# Signals and faults


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_sigterm_to_one_rank_saves_and_both_exit_cleanly(small_run, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step, save it, and exit 0."""
    out = tmp_path / "run"
    proc = launch(small_run(out, 500), tmp_path / "log")
    wait_until(lambda: metrics(out), proc)
    os.kill(worker_pids(proc)[1], signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-3000:]
    last = metrics(out)[-1]["step"]
    assert last < 500 and list_checkpoints(out) == [out / f"checkpoint-{last}"]
    assert damage(out / f"checkpoint-{last}") is None and read_state(out / f"checkpoint-{last}").step == last
    assert "got a signal on another rank: saved" in (tmp_path / "log").read_text()


def test_ctrl_c_saves_and_exits_0_with_nothing_after_its_message(small_run, tmp_path):
    """`python train.py` and Ctrl-C (SIGINT) in training: a checkpoint is saved, the exit status is 0, and the last
    line says where to resume from: no traceback, and no progress bar drawn again after it."""
    out, log = tmp_path / "run", tmp_path / "log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the lines in the order written
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *small_run(out, 500)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)
    wait_until(lambda: metrics(out), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    [saved] = list_checkpoints(out)
    text = log.read_text()
    assert text.endswith(f"got SIGINT: saved {saved}; continue with --resume auto\n"), text[-3000:]
    assert "Traceback" not in text


def test_first_signal_is_noted_and_second_exits_at_once():
    code = ("import os, signal, time, checkpointing; stop = checkpointing.StopOnSignal(); stop.begin_training(); "
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1); print(stop.signal, flush=True); "
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30); print('alive')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "SIGTERM\n"


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_dead_rank_ends_the_run_in_bounded_time(small_run, tmp_path):
    """Rank 1 SIGKILLed: rank 0 does not hang; the run fails within the process-group timeout."""
    out = tmp_path / "run"
    log = tmp_path / "log"
    proc = launch(small_run(out, 500, "--dist_timeout", "10"), log)
    wait_until(lambda: metrics(out), proc)
    t0 = time.monotonic()
    os.kill(worker_pids(proc)[1], signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    assert time.monotonic() - t0 < 60
    if DEVICE.type == "cpu":  # gloo sees the closed connection at once; NCCL waits for --dist_timeout
        assert "rank 0: lost contact with another rank" in log.read_text()


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_tokenizing_longer_than_dist_timeout_does_not_fail_the_waiting_rank(small_run, tmp_path):
    """#13: rank 0 tokenizes for 15 s, three times --dist_timeout, while rank 1 waits for it: the run trains its 2
    steps."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = launch(small_run(out, 2, "--dist_timeout", "5"), log, slow_tokenizing(tmp_path, 15))
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_a_rank_waiting_for_the_data_gives_up_after_dist_timeout_of_silence():
    """#13: a rank waits for rank 0 of its node as long as that one shows progress (2 s here, twice the patience),
    and gives up, naming --dist_timeout, once rank 0 has been silent for the patience (1 s)."""
    import threading

    import data

    store = torch.distributed.HashStore()
    first, other = data.FirstOnNode(store, 0, 0, 1.0), data.FirstOnNode(store, 1, 1, 1.0)
    threading.Timer(2.0, first.done).start()
    t0 = time.monotonic()
    other.wait()
    assert 2.0 <= time.monotonic() - t0 < 3.0
    silent = data.FirstOnNode(store, 3, 1, 1.0)  # rank 2, rank 0 of its node, never started
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^rank 3: rank 2, which prepares the data on this node, has shown no "
                                           r"progress for 1 s \(--dist_timeout\)"):
        silent.wait()
    assert 1.0 <= time.monotonic() - t0 < 2.0


def test_sigterm_during_evaluation_abandons_it_at_the_next_batch_and_saves(small_run, tmp_path, monkeypatch, capsys):
    """#14: SIGTERM during the 2nd of 6 eval batches: no further eval batch runs, checkpoint-2 is saved, and step 2
    is recorded without an eval loss."""
    real, evals = train.loss_sum, []

    def loss_sum(model, batch, device):
        if not model.training:
            evals.append(batch)
            if len(evals) == 6 + 2:  # after the 6 of the evaluation before training
                os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, device)

    monkeypatch.setattr(train, "loss_sum", loss_sum)
    out = tmp_path / "run"
    history = run_inprocess(small_run(out, 4, "--eval_fraction", "0.5", "--eval_every", "2", "--batch_size", "1"))
    assert len(evals) == 6 + 2
    assert [h["step"] for h in history] == [1, 2] and "eval_loss" not in metrics(out)[-1]
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert f"got SIGTERM: evaluation at step 2 abandoned; saved {out / 'checkpoint-2'}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_ctrl_c_before_training_is_acknowledged_at_once_and_stops_without_a_checkpoint(small_run, tmp_path):
    """#15: SIGINT to torchrun (Ctrl-C) while rank 0 tokenizes for 60 s: each rank says at once that it stops, every
    process is gone within 15 s, and no checkpoint or metrics are written."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = launch(small_run(out, 2, "--save_every", "1"), log, slow_tokenizing(tmp_path, 60))
    wait_until(lambda: (tmp_path / "tokenizing").exists(), proc)
    ranks = worker_pids(proc)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    finally:
        for pid in [*ranks.values(), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    for rank in ranks:
        assert f"rank {rank}: got SIGINT before training started: stopping now; nothing is saved" in text, text[-3000:]
    assert not (out / "metrics.jsonl").exists() and list(out.glob("checkpoint-*")) == []


def test_a_collective_that_timed_out_names_dist_timeout(small_run, tmp_path, monkeypatch, capsys):
    """#13: when a collective timed out (gloo's words here), the message says how long a rank waits and which flag
    raises it."""
    import data

    def timed_out(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation")

    monkeypatch.setattr(data, "prepare", timed_out)
    with pytest.raises(RuntimeError, match="Timed out waiting 4000ms"):
        run_inprocess(small_run(tmp_path / "run", 2, "--dist_timeout", "4"))
    assert ("lost contact with another rank ([gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for "
            "recv operation). A rank waits --dist_timeout (4 s) for the others: if one was busy, not dead, raise it. "
            "The launcher's log") in capsys.readouterr().out


def poison(monkeypatch, calls: set[int]) -> None:
    """The loss is NaN on these calls (1-based; one call per micro-batch), as a bad batch would make it."""
    real, count = train.loss_sum, [0]

    def loss_sum(*args, **kwargs):
        count[0] += 1
        loss, n = real(*args, **kwargs)
        return (loss * math.nan if count[0] in calls else loss), n

    monkeypatch.setattr(train, "loss_sum", loss_sum)


def test_nonfinite_step_is_skipped_and_changes_nothing(small_run, tmp_path, monkeypatch):
    """A NaN loss at step 2: the step is logged as skipped, and no LoRA weight or AdamW moment changes."""
    poison(monkeypatch, {2})
    out = tmp_path / "run"
    history = run_inprocess(small_run(out, 3, "--save_every", "1"))
    assert [h["skipped"] for h in history] == [False, True, False]
    assert math.isnan(history[1]["loss"]) and math.isfinite(history[2]["loss"])
    one, two = out / "checkpoint-1", out / "checkpoint-2"
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    a, b = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (one, two))
    assert all(torch.equal(a[p][s], b[p][s]) for p in a for s in a[p])


def test_too_many_bad_steps_name_the_last_checkpoint_whose_next_step_was_finite(small_run, tmp_path, monkeypatch):
    """NaN from step 4 on, checkpoints at 2 and 4: the stop names checkpoint-2, whose next step (3) was finite, not
    checkpoint-4, whose next step was NaN."""
    poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(RuntimeError, match=r"2 consecutive steps \(up to step 5\).*next step was finite is \S+"
                                           r"checkpoint-2:"):
        run_inprocess(small_run(tmp_path / "run", 8, "--save_every", "2", "--max_bad_steps", "2"))


def test_a_checkpoint_after_a_step_that_blew_the_weights_up_is_not_called_good(small_run, tmp_path):
    """--lr 1e30: step 1 is finite but makes the weights huge, and every step after it is NaN, so no checkpoint is
    good: the stop says none, not checkpoint-2."""
    with pytest.raises(RuntimeError, match=r"consecutive steps .*next step was finite is none"):
        run_inprocess(small_run(tmp_path / "run", 8, "--save_every", "2", "--max_bad_steps", "3", "--lr", "1e30"))
    assert metrics(tmp_path / "run")[0]["skipped"] is False and metrics(tmp_path / "run")[-1]["skipped"] is True


def test_max_bad_steps_0_runs_on_but_a_non_finite_last_step_fails(small_run, tmp_path, monkeypatch):
    """--max_bad_steps 0 never stops early, but a run whose last step was NaN fails at the end and saves no adapter."""
    poison(monkeypatch, set(range(3, 100)))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"the last step, 6, had a non-finite loss.*none"):
        run_inprocess(small_run(out, 6, "--max_bad_steps", "0"))
    assert len(metrics(out)) == 6 and not (out / "adapter_model.safetensors").exists()


def test_torn_metrics_line_does_not_block_resume(small_run, tmp_path):
    """A kill (or a full disk) mid-write leaves half a line in metrics.jsonl: --resume auto cuts the file back to
    the checkpoint's step and goes on, and the file then reads as the uninterrupted run's."""
    out = tmp_path / "run"
    ref = run_inprocess(small_run(out, 6, "--save_every", "3"))
    shutil.rmtree(out / "checkpoint-6")  # as if killed while writing step 6's line, after checkpoint-3
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.json"):
        (out / name).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    resumed = run_inprocess(small_run(out, 6, "--save_every", "3", "--resume", "auto"))
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert [m["loss"] for m in metrics(out)] == losses(ref)  # every line whole, each step once


def test_out_of_memory_says_what_to_lower(small_run, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="step 1: lower --batch_size .*--seq_len .*"
                       "--offload_activations .*--tiled_mlp .*--cpu_offload"):
        run_inprocess(small_run(tmp_path / "run", 2))


@pytest.mark.parametrize("hidden, layers, tokens, flags", [
    (4096, 32, "131,072", "--offload_activations --tiled_mlp 8192"),
    (8192, 80, "32,768", "--cpu_offload --offload_activations --tiled_mlp 8192 --lora_rank 16")])
def test_out_of_memory_names_the_longest_sequence_measured_for_the_shape(hidden, layers, tokens, flags):
    """For a shape BENCHMARKS.md measured (8B, 70B), the advice says how far it went, and with which flags."""
    from transformers import LlamaConfig

    cfg = train.Config()
    advice = train.out_of_memory(cfg, LlamaConfig(hidden_size=hidden, num_hidden_layers=layers), 3)
    assert f"{tokens} tokens fitted at batch 1 in 24 GiB with {flags} " in advice
    assert "tokens fitted" not in train.out_of_memory(cfg, LlamaConfig(hidden_size=64, num_hidden_layers=2), 3)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals, before any work


def test_output_dir_with_a_finished_run_is_refused(small_run, tmp_path):
    """A finished run without checkpoints (adapter, metrics) is not overwritten without --overwrite, nor restarted by
    --resume auto; --overwrite replaces the whole run, metrics included."""
    out = tmp_path / "run"
    run_inprocess(small_run(out, 2))
    for flags in ([], ["--resume", "auto"]):
        with pytest.raises(ResumeError, match="holds a finished run's adapter and no checkpoint.*--overwrite"):
            run_inprocess(small_run(out, 3, *flags))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    run_inprocess(small_run(out, 3, "--overwrite"))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_second_run_in_one_output_dir_is_refused_and_a_killed_runs_lock_does_not_block(small_run, tmp_path):
    """While a run trains in output_dir, another (even --resume auto) is refused at once, naming the holder's host
    and pid; once that run is SIGKILLed, the same command starts."""
    out = tmp_path / "run"
    proc = launch(small_run(out, 500, "--resume", "auto"), tmp_path / "log")
    wait_until(lambda: metrics(out), proc)
    rank0 = worker_pids(proc)[0]
    in_use = rf"is in use by another run \(host {socket.gethostname()} pid {rank0}\)"
    with pytest.raises(run_folder.FolderError, match=in_use):
        run_inprocess(small_run(out, 2, "--resume", "auto"))
    for pid in worker_pids(proc).values():
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert [h["step"] for h in run_inprocess(small_run(out, 2, "--resume", "auto"))] == [1, 2]


def test_final_save_killed_midway_leaves_no_mixed_adapter(small_run, tmp_path):
    """SIGKILL while the final adapter's files are renamed into output_dir: the folder holds no adapter_config.json
    that could describe other weights, and relaunching with --resume auto writes the whole set and removes the
    temporary folder."""
    out = tmp_path / "run"
    args = small_run(out, 2, "--save_every", "2", "--resume", "auto")
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import train
real = os.replace
def replace(src, dst):  # the kill falls just before the last file of the final adapter goes in
    if str(src).endswith("adapter_config.json") and "checkpoint" not in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
train.train(train.parse_config({args!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert list(out.glob(".*.tmp-*"))  # what the kill left behind
    run_inprocess(args)
    assert not list(out.glob("*.tmp-*")) and not list(out.glob(".*.tmp-*"))
    saved = load_file(out / "adapter_model.safetensors")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert all(v.shape[0] == 4 or v.shape[1] == 4 for v in saved.values())
    assert json.loads((out / "train_config.json").read_text())["lora_rank"] == 4


def test_output_dir_with_another_runs_checkpoints_is_refused(small_run, tmp_path):
    out = tmp_path / "run"
    run_inprocess(small_run(out, 2, "--save_every", "2"))
    with pytest.raises(ResumeError, match="holds another run's checkpoints.*--resume auto.*--overwrite"):
        run_inprocess(small_run(out, 2))
    run_inprocess(small_run(out, 1, "--overwrite"))
    assert list_checkpoints(out) == []


@pytest.fixture(scope="module")
def saved_run(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    run_inprocess(small_run(out, 2, "--save_every", "2"))
    return out


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "8"], "--lora_rank is 8, the checkpoint's run used 4"),
    (["--lora_targets", "q_proj"], "--lora_targets is 'q_proj'"),
    (["--model", "MISTRAL"], "is not the base model the checkpoint was trained on"),
    (["--dataset", "builtin"], r"the training rows differ .*--dataset '\S+d.jsonl' -> 'builtin'"),
    (["--dataset", "OTHER"], r"the training rows differ .*-> '\S+other.jsonl'"),  # as many rows: epochs agree
    (["--seq_len", "32"], "--seq_len is 32, the checkpoint's run used 64"),
    (["--max_grad_norm", "0.5"], "--max_grad_norm is 0.5, the checkpoint's run used 1.0"),
    (["--max_steps", "4"], r"--max_steps is 4, the checkpoint's run used 2 \(the LR schedule"),
    # auto decides chat once the tokenizer has a template: what is compared is the format decided
    (["--chat_template", "chatml"], r"the training rows differ .*--prompt_format 'alpaca' -> 'chat'"),
])
def test_resume_with_other_model_or_lora_is_refused_before_loading(small_run, saved_run, checkpoints, monkeypatch,
                                                                   flags, message):
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    other = small_run.data_file.with_name("other.jsonl")  # the same number of rows, other words
    other.write_text(small_run.data_file.read_text().replace("red", "pink").replace("dog", "fox"))
    flags = [str(checkpoints("mistral")) if f == "MISTRAL" else str(other) if f == "OTHER" else f for f in flags]
    with pytest.raises(ResumeError, match=message):
        run_inprocess(small_run(saved_run, 2, "--resume", "auto", *flags))


def test_targets_are_compared_by_the_linears_they_select(small_run, saved_run, tmp_path):
    """A run saved with other targets resumes when they select the same linears, as Llama's by name and the default
    "all-linear" do (runs from before that default); where they select others (Phi-3 fuses q/k/v and gate/up) the
    refusal says to pass the checkpoint's value."""
    shutil.copytree(saved_run, tmp_path / "run")  # the shared run stays as it was, whatever happens here
    resumed = run_inprocess(small_run(tmp_path / "run", 2, "--resume", "auto", "--lora_targets", LLAMA_LINEARS))
    assert resumed == []  # it was finished: nothing left to train
    path = list_checkpoints(saved_run)[-1]
    state = read_state(path)
    state.config["lora_targets"] = LLAMA_LINEARS
    run = dict(world_size=1, steps_per_epoch=state.steps_per_epoch, base_fingerprint=state.base_fingerprint,
               data_fingerprint=state.data_fingerprint, config={**state.config, "lora_targets": lora.ALL_LINEAR})
    settings = {f.name: f.metadata for f in dataclasses.fields(train.Config)}
    checkpointing.check_resumable(state, path, run, settings, tiny_config("llama"))
    with pytest.raises(ResumeError, match=r"--lora_targets is 'all-linear', the checkpoint's run used 'q_proj,k_proj"
                                          r".*\(compared by the linears each selects in this model: pass the"):
        checkpointing.check_resumable(state, path, run, settings, tiny_config("phi3"))


def test_resume_on_another_world_size_is_refused(saved_run):
    path = list_checkpoints(saved_run)[-1]
    state = read_state(path)
    run = dict(world_size=2, steps_per_epoch=3, base_fingerprint=state.base_fingerprint,
               data_fingerprint=state.data_fingerprint, config=state.config)
    with pytest.raises(ResumeError, match="2 ranks now, 1 saved it"):
        checkpointing.check_resumable(state, path, run, {})


def test_resume_from_a_folder_that_is_no_checkpoint(small_run, tmp_path):
    with pytest.raises(ResumeError, match="not a checkpoint folder"):
        run_inprocess(small_run(tmp_path / "run", 2, "--resume", str(tmp_path)))


def test_resume_path_of_another_run_never_writes_over_a_run(small_run, tmp_path, monkeypatch):
    """(1) --resume PATH from another run folder into an --output_dir holding a run is refused, before the model
    loads, and that run is left as it was; with --overwrite the run is replaced by the one resumed, exactly."""
    run_b, run_a = tmp_path / "o_B", tmp_path / "o_A"
    run_inprocess(small_run(run_b, 2, "--save_every", "2"))
    before = {p.relative_to(run_b): p.read_bytes() for p in run_b.rglob("*") if p.is_file()}
    first = run_inprocess(small_run(run_a, 2, "--save_every", "1", "--lr", "5e-3"))
    args = small_run(run_b, 2, "--lr", "5e-3", "--resume", str(run_a / "checkpoint-1"))
    with monkeypatch.context() as m:
        m.setattr(train, "build_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
        with pytest.raises(ResumeError, match=rf"--resume {run_a}/checkpoint-1 is a checkpoint of another run "
                                              rf"folder, and --output_dir {run_b} holds a run of its own "
                                              r"\(checkpoint-2\): pass --overwrite to replace that run"):
            run_inprocess(args)
    assert {p.relative_to(run_b): p.read_bytes() for p in run_b.rglob("*") if p.is_file()} == before
    resumed = run_inprocess([*args, "--overwrite"])
    assert [m["step"] for m in metrics(run_b)] == [2] and losses(resumed) == losses(first)[1:]
    assert list_checkpoints(run_b) == []  # B's checkpoint-2 went with the rest of B's run


def test_resume_auto_with_overwrite_is_refused(checkpoints, tmp_path, monkeypatch):
    """(10) --resume auto continues the run in --output_dir and --overwrite deletes it: the two are refused together,
    before the data is tokenized."""
    with pytest.raises(ResumeError, match="--resume auto continues the run in .*out and --overwrite deletes it: "
                                          "pass one of them"):
        refused_before_loading(monkeypatch, tmp_path, checkpoints("llama"), tokenizes=False,
                               args=("--resume", "auto", "--overwrite"))


def test_output_dir_inside_the_dataset_folder_is_refused(checkpoints, small_run, tmp_path, monkeypatch):
    """(12) An --output_dir that is the --dataset folder, or inside it, is refused before the data is tokenized: the
    run's own metrics.jsonl would be read as data on resume. Nothing is created in the dataset folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(small_run.data_file, folder)
    for out in (folder, folder / "runs" / "first"):
        with pytest.raises(ResumeError, match=rf"--output_dir {out} is inside the --dataset folder {folder}: "
                                              r"choose an --output_dir outside it"):
            refused_before_loading(monkeypatch, tmp_path, checkpoints("llama"), tokenizes=False,
                                   args=("--dataset", str(folder), "--output_dir", str(out)))
    assert sorted(p.name for p in folder.iterdir()) == ["d.jsonl"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_holding_a_model_is_refused_and_left_as_it_was(checkpoints, tmp_path, monkeypatch, overwrite):
    """An --output_dir that holds a model (config.json), such as the --model folder itself, is refused before the
    data is tokenized: a run would write its tokenizer files over the model's, and --overwrite would delete them.
    Every file of the folder is as it was."""
    model = tmp_path / "model"
    shutil.copytree(checkpoints("llama"), model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    assert any(name.startswith("tokenizer") for name in before)
    with pytest.raises(ResumeError, match=rf"--output_dir {model} holds a model \(config\.json\): a run writes its "
                                          r"tokenizer .* choose another --output_dir"):
        refused_before_loading(monkeypatch, tmp_path, model, tokenizes=False,
                               args=("--output_dir", str(model), *["--overwrite"] * overwrite))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_resume_names_the_run_folder_itself_as_such(small_run, saved_run, monkeypatch):
    """(6) --resume OUTPUT_DIR (the run folder, not a checkpoint of it) is refused before the data is tokenized,
    saying it is the run folder and naming --resume auto and its newest checkpoint."""
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    monkeypatch.setattr(data, "prepare", lambda *a, **k: pytest.fail("tokenized the data before refusing"))
    with pytest.raises(ResumeError) as refusal:
        run_inprocess(small_run(saved_run, 2, "--resume", str(saved_run)))
    assert str(refusal.value) == (f"--resume {saved_run} is the run folder itself (--output_dir), not a checkpoint: "
                                  f"pass --resume auto to continue from its newest checkpoint, "
                                  f"{saved_run / 'checkpoint-2'}, or --resume one of its checkpoint-N")


def test_resume_auto_of_a_finished_run_changes_nothing(small_run, tmp_path, capsys):
    """(11) --resume auto on a run that reached its last step says so and leaves every file in the folder
    byte-identical (the lock file aside: it names its holder), samples and final adapter included."""
    out, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("red\n")
    args = small_run(out, 2, "--save_every", "2", "--sample_prompts", str(prompts), "--sample_tokens", "2")

    def files():
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    run_inprocess(args)
    before = files()
    capsys.readouterr()
    assert run_inprocess([*args, "--resume", "auto"]) == []
    assert files() == before
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{out} holds a finished run: checkpoint-2 is its last step, 2, and its adapter is saved; nothing to do (to "
        "train longer, start a new run in another --output_dir: another --max_steps or --epochs is refused on resume)")
