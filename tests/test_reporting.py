"""--report_to: TensorBoard's events and W&B's offline run, each read back with its own reader, hold metrics.jsonl's
numbers and samples.jsonl's text, and a resumed run has each step once; the adapter folder meets vLLM's rules."""
import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
import wandb
from conftest import run_inprocess
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoConfig, AutoModelForCausalLM
from wandb.proto import wandb_internal_pb2

import peft_format
import reporting
import train

WORDS = "red blue green black white one two three four five cat dog".split()


@pytest.fixture(autouse=True)
def _wandb_reads_the_environment_anew():
    """W&B reads its environment (WANDB_MODE...) once per process, at its first init, until wandb.teardown()."""
    yield
    wandb.teardown()


@pytest.fixture(scope="module")
def wandb_offline(tmp_path_factory):
    """W&B in offline mode, its settings and caches in an empty folder, as on a machine that never logged in."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(home))
        yield


@pytest.fixture(scope="module")
def flags(checkpoints, tmp_path_factory):
    """Flags of a short run on 12 examples, with both backends and two sample prompts."""
    root = tmp_path_factory.mktemp("reporting-data")
    data_file, prompts = root / "d.jsonl", root / "prompts.txt"
    data_file.write_text("".join(json.dumps({"instruction": "Say the word.", "input": w, "output": w}) + "\n"
                                 for w in WORDS))
    prompts.write_text('{"instruction": "Say the word.", "input": "red"}\nOnce upon\n')

    def make(out: Path, steps: int, *extra: str) -> list[str]:
        return ["--model", str(checkpoints("llama")), "--dataset", str(data_file), "--output_dir", str(out),
                "--max_steps", str(steps), "--seq_len", "64", "--batch_size", "2", "--warmup_steps", "0",
                "--report_to", "tensorboard,wandb", "--sample_prompts", str(prompts), "--sample_tokens", "4", *extra]
    return make


@pytest.fixture(scope="module")
def reported_run(flags, wandb_offline, tmp_path_factory):
    """A 4-step run whose LoRA shape and eval come from a --config file, with both backends."""
    root = tmp_path_factory.mktemp("reported")
    config = root / "run.yaml"
    # lr: low enough that the samples are not all empty yet (the short answers teach EOS first), in the spelling
    # PyYAML reads as a string
    config.write_text("lora_rank: 8\nlora-alpha: 16\nlr: 2e-3\neval_fraction: 0.25\neval_every: 2\nsave_every: 2\n")
    out = root / "out"
    run_inprocess([*flags(out, 4), "--config", str(config)])  # the file's lr overrides none given on the command line
    return out


def metrics(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    """metrics.jsonl's records (samples.jsonl's with that name)."""
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]  # TensorBoard keeps scalars as float32


def tensorboard_events(out: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[int, str]]:
    """Every scalar curve as (step, value) pairs, and the samples' text by step, as TensorBoard's reader loads them
    (it applies the purge that a resumed writer asks for)."""
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    curves = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    return curves, texts


def wandb_runs(out: Path) -> list[tuple[str, list[dict]]]:
    """Each offline run folder under out/wandb, oldest first: its run id and history rows, read from W&B's own
    transaction log (run-ID.wandb: LevelDB's log format of wandb_internal_pb2.Record messages)."""
    # W&B's service process writes that log behind run.finish(): in the whole suite this once found no history in a
    # file that held all of it afterwards (its last write 0.13 s after metrics.jsonl's). teardown waits for the
    # service to finish writing.
    wandb.teardown()
    runs = []
    for file in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending, run_id, rows = file.read_bytes(), 7, b"", None, []  # 7: W&B's header
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # too little of the 32 KiB block left for a header: zeros
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or its last piece
                record = wandb_internal_pb2.Record.FromString(pending)
                pending = b""
                if record.HasField("run"):
                    run_id = record.run.run_id
                if record.HasField("history"):
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})  # "train/loss" comes as nested keys
        runs.append((run_id, rows))
    return runs


def test_backends_hold_the_numbers_of_metrics_jsonl(reported_run):
    """Per step and curve, TensorBoard's scalar is metrics.jsonl's number in float32 and W&B's is the number itself;
    both hold samples.jsonl's samples at their steps."""
    want = metrics(reported_run)
    assert [m["step"] for m in want] == [0, 1, 2, 3, 4] and "eval_loss" in want[2] and "eval_loss" in want[4]
    assert set(want[0]) == {"step", "eval_loss"}  # the eval loss before training
    curves, texts = tensorboard_events(reported_run)
    assert set(curves) == set(reporting.SCALARS.values())
    for key, tag in reporting.SCALARS.items():
        assert curves[tag] == [(m["step"], float32(m[key])) for m in want if key in m], tag
    by_step = {}
    for s in metrics(reported_run, "samples.jsonl"):
        by_step.setdefault(s["step"], []).append(s)
    assert sorted(by_step) == [2, 4]  # at the checkpoint of step 2, and at the end
    assert any(s["completion"] for s in metrics(reported_run, "samples.jsonl"))
    for step, records in by_step.items():
        assert all(r["prompt"] in texts[step] and r["completion"] in texts[step] for r in records)

    [(run_id, rows)] = wandb_runs(reported_run)
    assert [row["_step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4]
    for m in want:
        row = {k: v for r in rows if r["_step"] == m["step"] for k, v in r.items()}
        assert {tag: row[tag] for key, tag in reporting.SCALARS.items() if key in m} == {
            tag: m[key] for key, tag in reporting.SCALARS.items() if key in m}
        if m["step"] in by_step:
            folder = next(reported_run.glob(f"wandb/offline-run-*-{run_id}/files"))
            table = json.loads((folder / row["samples/path"]).read_text())  # W&B's table, a file beside its log
            assert table["data"] == [[r["prompt"], r["completion"]] for r in by_step[m["step"]]]
    assert json.loads((reported_run / "checkpoint-2" / "trainer_state.json").read_text())["reporting"] == {
        "wandb_run_id": run_id}


def test_run_folder_saves_the_settings_a_config_file_resolved_to(reported_run):
    """train_config.json (and each checkpoint's) holds the resolved values, the file's among them, and the file's
    name: what merge.py, generate.py and a resume read."""
    for folder in (reported_run, reported_run / "checkpoint-2"):
        saved = json.loads((folder / "train_config.json").read_text())
        assert (saved["lora_rank"], saved["lora_alpha"], saved["lr"], saved["eval_every"]) == (8, 16.0, 2e-3, 2)
        assert saved["max_steps"] == 4 and saved["config"].endswith("run.yaml")


def test_resumed_run_continues_the_curves_each_step_once(flags, wandb_offline, tmp_path, monkeypatch, capsys):
    """A run that dies in step 5 after checkpoint-3, resumed: TensorBoard shows steps 1-6 once each, with the final
    metrics.jsonl's numbers (the resumed attempt's 4 replaces the first's); W&B's two offline folders are one run id,
    the second holding only the steps after the first's last (4), so each step is there once, with those numbers."""
    out, real, calls = tmp_path / "run", train.train_step, [0]

    def dies_in_step_5(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("killed in step 5")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dies_in_step_5)
    args = flags(out, 6, "--save_every", "3", "--lora_rank", "4", "--lora_alpha", "8", "--resume", "auto")
    with pytest.raises(RuntimeError, match="killed in step 5"):
        run_inprocess(args)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    first_attempt = {m["step"]: m for m in metrics(out)}
    monkeypatch.setattr(train, "train_step", real)
    run_inprocess(args)
    assert "warning: --lora_rank 4 is not a rank vLLM's --max-lora-rank takes" in capsys.readouterr().out

    want = metrics(out)
    assert [m["step"] for m in want] == [1, 2, 3, 4, 5, 6]
    assert want[3]["loss"] == first_attempt[4]["loss"]  # exact resume: the step the first attempt logged twice over
    curves, _ = tensorboard_events(out)
    assert curves["train/loss"] == [(m["step"], float32(m["loss"])) for m in want]
    assert curves["train/grad_norm"] == [(m["step"], float32(m["grad_norm"])) for m in want]

    (first_id, first), (second_id, second) = wandb_runs(out)
    assert first_id == second_id == json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())[
        "reporting"]["wandb_run_id"]
    steps = [row["_step"] for row in first + second if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [row["train/loss"] for row in first + second if "train/loss" in row] == [m["loss"] for m in want]


def test_a_backend_that_cannot_start_is_refused_before_the_model_loads(flags, tmp_path, monkeypatch):
    """W&B online without a login: the run stops with W&B's reason and the way to log offline; no model loads."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("HOME", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # no ~/.netrc, no saved login
        monkeypatch.setenv(name, str(tmp_path / "empty"))
    monkeypatch.setattr(train, "build_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(RuntimeError, match="--report_to wandb could not start .*No API key.*WANDB_MODE=offline"):
        run_inprocess(flags(tmp_path / "run", 2))


def test_a_backend_that_fails_while_writing_is_turned_off_and_training_goes_on(capsys):
    """A backend raising mid-run (a full disk, W&B's service gone) loses its own curve, not the run: it is warned
    about once and dropped, and the other backends get every step."""
    class Broken:
        def scalars(self, step, values):
            raise OSError(28, "No space left on device")

    class Kept:
        def __init__(self):
            self.got = []

        def scalars(self, step, values):
            self.got.append((step, values))

    kept = Kept()
    report = reporting.Reporters({"tensorboard": Broken(), "wandb": kept}, {})
    for step in (1, 2):
        report.step({"step": step, "loss": 1.0 / step, "lr": 0.1})
    assert kept.got == [(1, {"train/loss": 1.0, "train/lr": 0.1}), (2, {"train/loss": 0.5, "train/lr": 0.1})]
    assert list(report.backends) == ["wandb"]
    assert capsys.readouterr().out.count("warning: --report_to tensorboard failed at step 1") == 1


def test_unknown_or_missing_backend_is_refused_before_loading(monkeypatch):
    with pytest.raises(ValueError, match="'tensorbord' is not a backend: give tensorboard, wandb"):
        train.parse_config(["--report_to", "tensorboard,tensorbord"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import wandb fails
    with pytest.raises(ValueError, match="needs wandb, which is not installed here: pip install wandb"):
        train.parse_config(["--report_to", "wandb"])


# ---------------------------------------------------------------------------------------------------------------------
# vLLM


def test_adapter_folder_meets_vllms_rules(reported_run):
    """What vLLM's LoRA loader requires (vllm/lora/peft_helper.py, utils.parse_fine_tuned_lora_name, the rank check
    in its worker manager): a LORA config without modules_to_save or DoRA, bias none, a rank vLLM's --max-lora-rank
    takes; tensor keys "base_model.model.<module>.lora_A|lora_B.weight" for linears of the base, named in
    target_modules, shaped (r, in) and (out, r). Checked for the final adapter and a checkpoint-N."""
    run = json.loads((reported_run / "train_config.json").read_text())
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run["model"]))
    linears = {name: m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for folder in (reported_run, reported_run / "checkpoint-2"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and not config.get("modules_to_save") and not config.get("use_dora")
        assert config["bias"] == "none" and config["r"] == run["lora_rank"] == 8 and config["r"] in peft_format.VLLM_MAX_RANKS
        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            keys = {key: f.get_slice(key).get_shape() for key in f.keys()}
        assert len(keys) == 2 * 2 * 7  # 2 layers x the 7 default targets x A and B
        for key, shape in keys.items():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            assert match and match.group(1) in linears, key
            assert match.group(1).split(".")[-1] in config["target_modules"]
            linear = linears[match.group(1)]
            assert shape == ([config["r"], linear.in_features] if match.group(2) == "A" else
                             [linear.out_features, config["r"]]), key


def test_vllm_rank_warning_names_the_max_lora_rank_to_serve_with():
    assert peft_format.vllm_rank_warning(16) is None and peft_format.vllm_rank_warning(320) is None
    assert "--max-lora-rank 8" in peft_format.vllm_rank_warning(4)
    assert "--max-lora-rank 128" in peft_format.vllm_rank_warning(100)
    assert "merge.py" in peft_format.vllm_rank_warning(1024)
