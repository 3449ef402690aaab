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


def test_real_models_get_qlora_defaults_and_the_builtin_model_its_own(tmp_path):
    """A real model trains at QLoRA's usual lr 2e-4, r 64, alpha 16; the built-in one at configs/builtin.yaml's values,
    which --config and the flags override."""
    shape = ("lr", "lora_rank", "lora_alpha")
    real = train.parse_config(["--model", "org/name"])
    assert [getattr(real, k) for k in shape] == [2e-4, 64, 16.0]
    assert [getattr(train.parse_config([]), k) for k in shape] == [2e-3, 16, 32.0]
    assert [getattr(train.parse_config(["--model", "tiny", "--lora_rank", "8"]), k) for k in shape] == [2e-3, 8, 32.0]
    file = tmp_path / "run.yaml"
    file.write_text("lr: 1.0e-3\n")
    assert [getattr(train.parse_config(["--config", str(file)]), k) for k in shape] == [1e-3, 16, 32.0]
    file.write_text("model: org/name\n")  # a file naming a real model gets a real model's defaults
    assert [getattr(train.parse_config(["--config", str(file)]), k) for k in shape] == [2e-4, 64, 16.0]


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


def test_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """A key given twice in one file is refused with both its lines, never the last value silently winning (#5)."""
    file = tmp_path / "run.yaml"
    file.write_text("seq_len: 64\nlr: 1.0e-4\nseq_len: 128\n")
    with pytest.raises(ValueError) as e:
        train.parse_config(["--config", str(file)])
    assert str(e.value) == f"--config {file}: seq_len is given twice (lines 1 and 3); keep one"


def test_config_inside_a_config_says_files_do_not_nest(tmp_path):
    """`config:` in a config file is refused saying configs do not nest, not with a flag it resembles (#24)."""
    file = tmp_path / "run.yaml"
    file.write_text("config: other.yaml\nlr: 1.0e-4\n")
    with pytest.raises(ValueError) as e:
        train.parse_config(["--config", str(file)])
    assert str(e.value) == (f"--config {file}: 'config: other.yaml' names another config file, and config files do "
                            "not nest: copy its keys into this one")


PATHS = ["model", "dataset", "eval_split", "output_dir", "resume", "sample_prompts"]


def test_tilde_is_expanded_in_every_path_from_the_file_or_a_flag(tmp_path, monkeypatch):
    """`~` means the home folder in every path setting, whether the file or a flag (`--x=~/y`) gives it, and in
    --config's own path; names that are not paths (a Hub id, 'auto') are left alone (#9)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prompts.txt").write_text("hello\n")  # --sample_prompts must name a file that exists
    (tmp_path / "run.yaml").write_text("".join(f"{name}: ~/{name}\n" for name in PATHS if name != "sample_prompts")
                                       + "sample_prompts: ~/prompts.txt\n")
    cfg = train.parse_config(["--config=~/run.yaml", "--output_dir=~/elsewhere"])
    assert {name: getattr(cfg, name) for name in PATHS + ["config"]} == {
        "model": str(tmp_path / "model"), "dataset": str(tmp_path / "dataset"),
        "eval_split": str(tmp_path / "eval_split"), "output_dir": str(tmp_path / "elsewhere"),
        "resume": str(tmp_path / "resume"), "sample_prompts": str(tmp_path / "prompts.txt"),
        "config": str(tmp_path / "run.yaml")}
    cfg = train.parse_config(["--output_dir", "~user-that-is-not/x", "--model", "org/name", "--resume", "auto"])
    assert (cfg.output_dir, cfg.model, cfg.resume) == ("~user-that-is-not/x", "org/name", "auto")


@pytest.mark.parametrize("text, value", [
    ("seq_len: 0100\n", 100),  # YAML 1.1: octal, 64
    ("lr: 2e-4\n", 2e-4),  # YAML 1.1: a string
    ("lr: 2.0E-4\n", 2e-4),
    ("lr: .5\n", 0.5),
    ("lr: 1\n", 1.0),
])
def test_numbers_read_as_yaml_1_2(tmp_path, text, value):
    """Numbers read as YAML 1.2 writes them: 0100 is a hundred, 2e-4 a number (#28)."""
    file = tmp_path / "run.yaml"
    file.write_text(text)
    name = text.split(":")[0]
    assert getattr(train.parse_config(["--config", str(file)]), name) == value


@pytest.mark.parametrize("text, message", [
    ("lr: 1:30\n", "lr must be a number, got '1:30' (a string)"),  # YAML 1.1: sexagesimal, 90.0
    ("lr: '0.0002'\n", "lr must be a number, got '0.0002' (a string)"),
    ("lr: '2e-4'\n", "lr must be a number, got '2e-4' (a string)"),  # was taken, while '0.0002' was refused
    ("seq_len: 1_024\n", "seq_len must be an integer, got '1_024' (a string)"),  # YAML 1.1: 1024
    ("packing: yes\n", "packing must be true or false, got 'yes' (a string)"),  # YAML 1.1: true
    ("wandb_name: 2026-12-01\n", None),  # YAML 1.1: a date, refused as no string
])
def test_yaml_1_1_readings_are_strings(tmp_path, text, message):
    """What only YAML 1.1 reads as a number, a boolean or a date is a string: refused where a flag takes a number or a
    boolean, quoted or not (#28)."""
    file = tmp_path / "run.yaml"
    file.write_text(text)
    if message is None:
        assert train.parse_config(["--config", str(file)]).wandb_name == "2026-12-01"
        return
    with pytest.raises(ValueError) as e:
        train.parse_config(["--config", str(file)])
    assert str(e.value) == f"--config {file}: {message}"


@pytest.mark.parametrize("text", ["", "# lr: 2.0e-4\n\n# (only comments)\n", "{}\n"])
def test_config_file_without_settings_is_refused(tmp_path, text):
    """An empty --config file, one of comments only, or an empty mapping is refused, never run on the defaults."""
    file = tmp_path / "run.yaml"
    file.write_text(text)
    with pytest.raises(ValueError) as e:
        train.parse_config(["--config", str(file)])
    assert str(e.value) == (f"--config {file} holds no settings: write the flags to set in it, one per line (e.g. "
                            "'lr: 2.0e-4'), or leave --config out")
