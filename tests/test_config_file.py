"""--config FILE: the file's values are the flags' defaults, the command line overrides them, every shipped config
loads, and a bad file is refused naming the key and what it takes."""
import dataclasses

import pytest
import torch
import yaml
from conftest import ROOT

import train

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("lora_rank: 32\nlora-alpha: 8\nlr: 2e-4\npacking: true\nquant: fp4\n")  # 2e-4: a string to PyYAML
    cfg = train.parse_config(["--config", str(file), "--lora_rank", "64", "--no-packing"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lr, cfg.packing, cfg.quant) == (64, 8.0, 2e-4, False, "fp4")
    assert cfg.seq_len == train.Config.seq_len  # not in the file, not on the command line
    assert dataclasses.asdict(cfg)["config"] == str(file)  # what train_config.json records, beside the values


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_with_its_values_and_its_measured_figure(path, monkeypatch):
    """Each file in configs/ resolves, through parse_config, to exactly its keys' values, and says what was measured.
    They are for GPU machines: the GPU-only checks (--cpu_offload) are taken as on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    text = path.read_text()
    cfg = dataclasses.asdict(train.parse_config(["--config", str(path)]))
    assert {k: cfg[k.replace("-", "_")] for k in yaml.safe_load(text)} == {
        k: float(v) if isinstance(cfg[k], float) else v for k, v in yaml.safe_load(text).items()}
    assert any(line.startswith("# measured: ") for line in text.splitlines())


def test_builtin_config_is_what_train_py_runs_without_flags():
    cfg = dataclasses.asdict(train.parse_config(["--config", str(ROOT / "configs" / "builtin.yaml")]))
    assert {**cfg, "config": ""} == dataclasses.asdict(train.parse_config([]))
    assert {p.name for p in SHIPPED} >= {"builtin.yaml", "llama3-8b-24gb.yaml", "llama3-70b-24gb.yaml"}


@pytest.mark.parametrize("text, message", [
    ("- lr: 1\n", r"must be a mapping of flag names to values .* not a list"),
    ("lora_rnak: 8\n", r"'lora_rnak' is not a flag of train.py; did you mean lora_rank\?"),
    ("lora_rank: 16.5\n", r"lora_rank must be an integer, got 16.5 \(a number\)"),
    ("lora_rank: true\n", r"lora_rank must be an integer, got True \(a boolean\)"),
    ("packing: 'yes'\n", r"packing must be true or false, got 'yes' \(a string\)"),
    ("lr: fast\n", r"lr must be a number, got 'fast' \(a string\)"),
    ("dataset:\n", r"dataset must be a string, got None \(null\)"),
    ("quant: nf5\n", r"quant must be one of auto, nf4, fp4, none; got 'nf5'"),
    ("lora_rank: 8\nlora-rank: 16\n", r"lora_rank is given twice"),
    ("config: other.yaml\n", r"'config' is not a flag"),
    ("lr: [1\n", r"(?s)is not valid YAML: .*run.yaml\", line 1, column 5"),
])
def test_bad_config_file_is_refused_naming_the_key(tmp_path, text, message):
    file = tmp_path / "run.yaml"
    file.write_text(text)
    with pytest.raises(ValueError, match=message):
        train.parse_config(["--config", str(file)])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"--config {tmp_path / 'nope.yaml'}: No such file"):
        train.parse_config(["--config", str(tmp_path / "nope.yaml")])
