"""Pre-quantized checkpoints: transformers' own bitsandbytes 4-bit checkpoints load with their bytes as they are,
quantize.py writes that format, and training, merging and sampling work from such a base."""
import fcntl
import json
import os

import pytest
import torch
from conftest import (DEVICE, TOKENS, common, editable_copy, hf_greedy, make_adapter, reference_model,
                      refused_before_loading, run_inprocess, small_disk)
from safetensors.torch import load_file, save_file

import generate
import merge
import model_loading
import peft_format
import quantization
import quantize
from model_loading import ModelFolderError, load_model

# (quant, double quantization, the dtype transformers stores the packed bytes as): its default storage is uint8;
# bf16 storage is what FSDP needs and what quantize.py writes.
# A linear we dequantize to bf16 against transformers' 4-bit one: bit-exact on the CPU, where bitsandbytes' layer is
# F.linear with the dequantized weight; CUDA's 4-bit kernels may round a few bf16 ulps differently.
DEQUANTIZED = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=2e-2, atol=3e-2)
VARIANTS = [("nf4", True, torch.bfloat16), ("nf4", False, torch.uint8), ("fp4", True, torch.uint8),
            ("fp4", False, torch.bfloat16)]


def stored_tensors(folder):
    return {name: t for shard in sorted(folder.glob("*.safetensors")) for name, t in load_file(shard).items()}


def as_bytes(tensor):
    """The raw bytes: packed codes viewed as bf16 include NaN patterns, which torch.equal finds unequal to
    themselves."""
    return tensor.detach().cpu().reshape(-1).view(torch.uint8)


def linears_4bit(model):
    return {name: m for name, m in model.named_modules() if quantization.is_4bit(m)}


@pytest.mark.parametrize("quant, double_quant, storage", VARIANTS)
def test_logits_equal_transformers_on_its_own_checkpoint(prequantized, quant, double_quant, storage):
    """Built from a checkpoint transformers quantized and saved, our model gives transformers' logits on it, exactly:
    the same packed bytes and quant_state go through the same bitsandbytes layers. Each 4-bit linear follows the
    checkpoint (type, double quantization) and holds bf16-viewed bytes; lm_head stays bf16."""
    path = prequantized(quant, double_quant, storage)
    ours = load_model(path, quantization.AUTO, DEVICE, progress=False).eval()
    layers = linears_4bit(ours)
    assert len(layers) == 14 and type(ours.lm_head) is torch.nn.Linear
    for layer in layers.values():
        assert layer.weight.dtype == quantization.STORAGE and layer.weight.quant_type == quant
        assert layer.weight.quant_state.nested == double_quant and layer.quant_state is layer.weight.quant_state
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(path)(TOKENS).logits, rtol=0, atol=0)


def test_reference_keeps_its_stored_bytes_on_any_cpu(prequantized, monkeypatch):
    """(34) transformers' reference takes our kernel path on every CPU: after eval() and a no-grad forward, on a CPU
    that bitsandbytes finds AVX512-BF16 on, each of its 4-bit weights still holds the checkpoint's bytes."""
    import bitsandbytes

    # What bitsandbytes asks the CPU when it builds each Linear4bit: as an AVX512-BF16 CPU (Intel or AMD) answers
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    path = prequantized("nf4", True, torch.bfloat16)
    reference, stored = reference_model(path), stored_tensors(path)
    with torch.no_grad():
        reference(TOKENS)
    layers = linears_4bit(reference)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert torch.equal(as_bytes(layer.weight.data), as_bytes(stored[f"{name}.weight"])), name


def test_the_checkpoints_own_choice_of_4bit_linears_is_kept(prequantized):
    """transformers quantizes lm_head too when llm_int8_skip_modules is given, and keeps the listed linears 16-bit:
    ours keeps those down_proj in bf16 as stored, dequantizes the 4-bit lm_head (our lm_head is bf16), and gives
    transformers' logits (exactly on the CPU)."""
    path = prequantized("nf4", True, torch.bfloat16, skip=("down_proj",))
    stored = stored_tensors(path)
    assert "lm_head.weight.absmax" in stored and "model.layers.0.mlp.down_proj.weight.absmax" not in stored
    ours = load_model(path, quantization.AUTO, DEVICE, progress=False).eval()
    assert len(linears_4bit(ours)) == 12 and type(ours.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(path)(TOKENS).logits, **DEQUANTIZED)


def test_packed_bytes_are_the_stored_bytes(prequantized, monkeypatch):
    """No dequantize/requantize round trip: nothing is quantized while loading, and every 4-bit weight holds the
    checkpoint's packed bytes and absmax bit for bit (stored as uint8, viewed as bf16)."""
    path = prequantized("nf4", True, torch.uint8)
    monkeypatch.setattr(quantization, "quantize", lambda *a, **k: pytest.fail("quantized a pre-quantized weight"))
    ours = load_model(path, quantization.AUTO, DEVICE, progress=False)
    stored = stored_tensors(path)
    for name, layer in linears_4bit(ours).items():
        assert torch.equal(as_bytes(layer.weight.data), as_bytes(stored[f"{name}.weight"])), name
        assert torch.equal(layer.weight.quant_state.absmax.cpu(), stored[f"{name}.weight.absmax"]), name


def test_quant_none_dequantizes_to_transformers_logits(prequantized):
    """--quant none on a pre-quantized checkpoint: every linear dequantized to bf16, the same logits (exactly on the
    CPU, where bitsandbytes' 4-bit layer is F.linear with the dequantized weight)."""
    path = prequantized("fp4", True, torch.bfloat16)
    ours = load_model(path, "none", DEVICE, progress=False).eval()
    assert not linears_4bit(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(path)(TOKENS).logits, **DEQUANTIZED)


# ---------------------------------------------------------------------------------------------------------------------
# quantize.py


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_quantize_py_writes_what_transformers_loads(checkpoints, prequantized, tmp_path, quant):
    """quantize.py's checkpoint: transformers' from_pretrained loads it as 4-bit with our model's logits, exactly;
    our model from it holds the bytes our model quantized from the 16-bit original holds; and its tensors, quantized
    on the same device as transformers' own quantization, are those it saves (bf16 storage), bit for bit. It is its
    source's base (the same fingerprint, so adapters move between them); transformers' own 4-bit folder records no
    source, and is another."""
    src, out = checkpoints("llama"), tmp_path / "q"
    quantize.main(["--model", str(src), "--out", str(out), "--quant", quant, "--shard_size_mb", "0"])
    assert model_loading.fingerprint(out) == model_loading.fingerprint(src)
    assert model_loading.fingerprint(prequantized(quant)) != model_loading.fingerprint(src)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # each tensor in a shard of its own
    ours = load_model(out, quantization.AUTO, DEVICE, progress=False).eval()
    direct = load_model(src, quant, DEVICE, progress=False).eval()
    reference = reference_model(out)
    assert len(linears_4bit(reference)) == 14
    with torch.no_grad():
        logits = ours(TOKENS).logits
        torch.testing.assert_close(logits, reference(TOKENS).logits, rtol=0, atol=0)
        torch.testing.assert_close(logits, direct(TOKENS).logits, rtol=0, atol=0)
    for name, layer in linears_4bit(direct).items():
        assert torch.equal(as_bytes(layer.weight.data), as_bytes(ours.get_submodule(name).weight.data)), name
    theirs = stored_tensors(prequantized(quant, True, torch.bfloat16))
    if DEVICE.type != "cpu":  # transformers quantized on the CPU, whose FP4 bytes differ from the GPU kernel's (H200)
        quantize.main(["--model", str(src), "--out", str(out := tmp_path / "q-cpu"), "--quant", quant,
                       "--shard_size_mb", "0", "--device", "cpu"])
    written = stored_tensors(out)
    assert written.keys() == theirs.keys()
    for name, tensor in written.items():
        assert torch.equal(as_bytes(tensor), as_bytes(theirs[name])), name
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_write_4bit_from_tensors_alone(checkpoints, tmp_path):
    """write_4bit takes (name, tensor) pairs and a config, no folder: a synthetic checkpoint from random tensors on
    meta shapes loads, in transformers with our logits. Tied weights (Gemma's lm_head) are written once."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints("gemma"))
    shapes = model_loading.build_skeleton(config, "none").state_dict()
    g = torch.Generator().manual_seed(0)
    tensors = ((name, torch.randn(t.shape, generator=g) * 0.1) for name, t in shapes.items())
    out = quantize.write_4bit(config, tensors, tmp_path / "synthetic", "nf4", progress=False)
    assert "lm_head.weight" in shapes and "lm_head.weight" not in stored_tensors(out)
    ours = load_model(out, quantization.AUTO, DEVICE, progress=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(out)(TOKENS).logits, rtol=0, atol=0)


def test_quantize_py_loses_nothing(checkpoints, tmp_path, monkeypatch):
    """A folder that is not empty is kept without --overwrite, and one that holds no model even with it; a write that
    fails midway leaves the old folder as it was and no temporary folder; a pre-quantized source is refused."""
    src, out = checkpoints("llama"), tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(quantize.QuantizeError, match="already exists; pass --overwrite"):
        quantize.quantize_checkpoint(str(src), out, progress=False)
    with pytest.raises(quantize.QuantizeError, match="is not a model folder .* refusing to delete it"):
        quantize.quantize_checkpoint(str(src), out, overwrite=True, progress=False)
    (out / "notes.txt").unlink()
    quantize.quantize_checkpoint(str(src), out, progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    calls = []

    def fail_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(quantize, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match=rf"writing {out} failed \(no space left on device"):
        quantize.quantize_checkpoint(str(src), out, "fp4", overwrite=True, shard_size_mb=0, progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    with pytest.raises(quantize.QuantizeError, match="is already quantized to nf4"):
        quantize.quantize_checkpoint(str(out), tmp_path / "again", progress=False)


def test_leftovers_of_killed_writers_are_removed_by_the_next(checkpoints, tmp_path):
    """(16) The hidden .OUT.tmp-PID folder that a SIGKILLed quantize.py or merge.py leaves is removed by the next run
    into the same --out; one that a writer still holds (running now) is left alone."""
    src, quantized, merged = checkpoints("llama"), tmp_path / "q", tmp_path / "m"

    def leftover(out, pid):
        folder = out.parent / f".{out.name}.tmp-{pid}"
        folder.mkdir()
        (folder / "model-00001.safetensors").write_bytes(bytes(4096))
        return folder

    leftover(quantized, 4194304)
    live = leftover(quantized, 1)
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running writer holds the folder it writes
    try:
        quantize.quantize_checkpoint(str(src), quantized, progress=False)
    finally:
        os.close(held)
    leftover(merged, 4194304)
    merge.merge(str(src), make_adapter(src, tmp_path / "adapter"), merged, verify=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.tmp-1", "adapter", "m", "q"]


def test_quantize_on_a_full_disk_says_so(checkpoints, tmp_path):
    """(21) quantize.py onto a full disk (a 64 KiB tmpfs): "no space left on device" with the folder, not safetensors'
    raw SafetensorError, and nothing left on the disk."""
    with small_disk(tmp_path / "disk", "64k") as disk:
        with pytest.raises(OSError, match=rf"^writing {disk}/q failed \(no space left on device: [\d.]+ MiB free in "
                                          rf"{disk}; free some space\)$"):
            quantize.quantize_checkpoint(str(checkpoints("llama")), disk / "q", progress=False)
        assert list(disk.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Training, merging and sampling from a pre-quantized base


def test_train_merge_and_generate_from_a_prequantized_base(prequantized, tmp_path, capsys):
    """Two steps train from transformers' nf4 checkpoint (--quant left at auto follows it, and the run records nf4);
    merge.py writes bf16(dequant(stored W) + B A alpha/r), W dequantized by bitsandbytes from the stored entries,
    into a plain 16-bit checkpoint; generate.py on the base alone samples what transformers' generate does."""
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoTokenizer

    base, run = prequantized("nf4", True, torch.uint8), tmp_path / "run"
    history = run_inprocess(common(base, run, steps=2))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert json.loads((run / "train_config.json").read_text())["quant"] == "nf4"
    assert "says the checkpoint is pre-quantized to nf4: its packed 4-bit weights are used as they are" in \
        capsys.readouterr().out

    merged = tmp_path / "merged"
    reported = merge.merge(str(base), run, merged, progress=False)
    assert reported < 0.5  # bf16 rounding of W' against the 4-bit model as trained
    with pytest.raises(merge.MergeError, match="--semantics bf16 .* pre-quantized to 4 bits"):
        merge.merge(str(base), run, tmp_path / "bf16", semantics="bf16", progress=False)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    out, transformers_base = stored_tensors(merged), reference_model(base)
    factors = load_file(run / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    layer = transformers_base.get_submodule(name)
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().cpu()
    a, b = (factors[f"{peft_format.PEFT_PREFIX}{name}.lora_{x}.weight"].float() for x in "AB")
    assert torch.equal(out[f"{name}.weight"], (w + b @ a * 2.0).bfloat16())  # alpha / r = 8 / 4
    assert torch.equal(out["lm_head.weight"], transformers_base.lm_head.weight.cpu())

    prompts = ['{"instruction": "Name the capital.", "input": "Peru"}', "Once upon a time"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    sampled = generate.main(["--model", str(base), "--max_new_tokens", "8", *[f"--prompt={p}" for p in prompts]])
    assert sampled == hf_greedy(transformers_base, tokenizer, prompts, 8)
    generate.main(["--model", str(base), "--adapter", str(run), "--max_new_tokens", "4", "--prompt", prompts[1]])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the problem


@pytest.fixture
def damaged(prequantized, tmp_path):
    """A fresh copy of transformers' nf4 checkpoint, and edit(name, change): the tensor `name` becomes change(it), or
    leaves its shard when that is None."""
    return editable_copy(prequantized("nf4", True, torch.uint8), tmp_path / "ckpt")


@pytest.mark.parametrize("entry", ["absmax", "quant_state.bitsandbytes__nf4", "nested_quant_map"])
def test_missing_quant_state_entry_is_named(damaged, entry):
    path, edit = damaged
    name = f"model.layers.0.self_attn.q_proj.weight.{entry}"
    edit(name, lambda tensor: None)
    with pytest.raises(ModelFolderError, match=rf"{name} is missing from the checkpoint"):
        load_model(path, progress=False)


def test_misshapen_packed_weight_and_damaged_quant_state_are_named(damaged):
    path, edit = damaged
    name = "model.layers.1.mlp.up_proj.weight"
    edit(f"{name}.quant_state.bitsandbytes__nf4", torch.zeros_like)  # its JSON all zero bytes
    with pytest.raises(ModelFolderError, match=rf"the 4-bit weight {name} in .* cannot be used: its quant_state"):
        load_model(path, progress=False)
    edit(name, lambda tensor: tensor[:100])
    with pytest.raises(ModelFolderError, match=rf"tensor {name} in .* holds \[100, 1\] U8 of packed 4-bit codes, but "
                                               r"the config's \[128, 64\] weight packs into \(4096, 1\) bytes"):
        load_model(path, progress=False)


def test_unknown_dtype_in_quant_state_is_named(damaged):
    """Defect 22: a quant_state whose JSON names a dtype torch lacks is refused naming the weight and its file."""
    path, edit = damaged
    name = "model.layers.0.mlp.down_proj.weight"

    def float99(tensor):
        state = json.loads(bytes(tensor.tolist()))
        return torch.tensor(list(json.dumps({**state, "dtype": "float99"}).encode()), dtype=torch.uint8)

    edit(f"{name}.quant_state.bitsandbytes__nf4", float99)
    with pytest.raises(ModelFolderError, match=rf"the 4-bit weight {name} in model-\d+-of-\d+\.safetensors cannot be "
                                               r"used: its quant_state entries cannot be read "
                                               r"\(AttributeError: .*float99"):
        load_model(path, progress=False)


def test_nan_weights_are_named_as_damage_not_as_the_head(damaged, tmp_path, monkeypatch):
    """Defect 11: a NaN nested_absmax gives NaN logits; train.py refuses before the first step and generate.py before
    printing a token, both naming the layer whose output is first not finite, never blaming the model's head."""
    import train

    path, edit = damaged
    edit("model.layers.1.mlp.up_proj.weight.nested_absmax", lambda tensor: torch.full_like(tensor, float("nan")))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained before refusing"))
    damage = r"the logits are not finite \(NaN or inf\).* first module whose output is not finite is " \
             r"model\.layers\.1\.mlp\.up_proj\b"
    with pytest.raises(ValueError, match=rf"llama, on the first rows: {damage}") as refusal:
        run_inprocess(common(path, tmp_path / "out", steps=1))
    assert "head" not in str(refusal.value)
    monkeypatch.setattr(generate, "print", lambda *a, **k: pytest.fail("printed a completion"), raising=False)
    with pytest.raises(ValueError, match=damage):
        generate.main(["--model", str(path), "--prompt", "Once upon a time", "--max_new_tokens", "4"])


@pytest.mark.parametrize("quantization_config, message", [
    ({"quant_method": "gptq", "bits": 4}, r"quantized with gptq \(quantization_config.quant_method\)"),
    ({"quant_method": "awq", "bits": 4}, r"quantized with awq"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, r"bitsandbytes 8-bit"),
])
def test_quantizations_we_cannot_read_are_refused_before_tokenizing(damaged, tmp_path, monkeypatch,
                                                                    quantization_config, message):
    path, _ = damaged
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with pytest.raises(ModelFolderError, match=rf"config\.json: the weights are {message}.*quantize\.py"):
        refused_before_loading(monkeypatch, tmp_path, path, tokenizes=False)


@pytest.mark.parametrize("quant", ["fp4", "nf4"])
def test_conflicting_quant_is_refused_before_tokenizing(prequantized, tmp_path, monkeypatch, quant):
    """--quant fp4 on an nf4 checkpoint, and --quant nf4 on an fp4 one: its 16-bit weights are not there to quantize."""
    path = prequantized("fp4" if quant == "nf4" else "nf4", True, torch.bfloat16)
    other = "fp4" if quant == "nf4" else "nf4"
    with pytest.raises(ModelFolderError, match=rf"--quant {quant}, but .*config\.json says the checkpoint is "
                                               rf"pre-quantized to {other}.*Leave --quant at auto"):
        refused_before_loading(monkeypatch, tmp_path, path, tokenizes=False, args=("--quant", quant))


def test_quantization_config_on_16bit_weights_is_refused(checkpoints, prequantized, tmp_path):
    """config.json saying bitsandbytes 4-bit over a folder of 16-bit weights (no quant_state entries at all) is
    refused naming config.json, where it loaded and trained a 16-bit base while saying 'pre-quantized to nf4'
    (transformers builds 4-bit layers that hold the 16-bit weights as they are)."""
    path = tmp_path / "ckpt"
    editable_copy(checkpoints("llama"), path)
    quantized = json.loads((prequantized("nf4", True, torch.uint8) / "config.json").read_text())
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantized["quantization_config"]}))
    with pytest.raises(ModelFolderError, match=r"config\.json says the weights are bitsandbytes nf4, but none of "
                                               r"them has quant_state entries.*remove quantization_config"):
        load_model(path, progress=False)


def test_quant_type_in_config_json_that_the_weights_contradict_is_named(damaged):
    """config.json saying fp4 over nf4 weights is refused naming config.json and the type the weights' quant_state
    says, not as a missing entry to download again."""
    path, _ = damaged
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"config\.json says the weights are bitsandbytes fp4, but their "
                                               r"quant_state entries .*bitsandbytes__nf4.*bnb_4bit_quant_type") as e:
        load_model(path, progress=False)
    assert "download it again" not in str(e.value)


def test_adapter_of_an_nf4_base_on_an_fp4_copy_is_refused_before_merging(checkpoints, tmp_path, monkeypatch):
    """quantize.py's nf4 and fp4 copies of one model share its fingerprint, but an adapter trained on the nf4 one
    learned on other weights than the fp4 one holds: generate.py and merge.py refuse it before loading or writing,
    naming the two types, where they asked to 'Leave --quant at auto' (flags neither was given; merge.py has no
    --quant) and merge.py did so only after writing the whole merge."""
    src = checkpoints("llama")
    for quant in ("nf4", "fp4"):
        quantize.main(["--model", str(src), "--out", str(tmp_path / quant), "--quant", quant])
    adapter = make_adapter(tmp_path / "nf4", tmp_path / "adapter", quant="nf4")
    refusal = rf"adapter in {adapter} was trained on an nf4 base.*{tmp_path / 'fp4'} is pre-quantized to fp4"
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=refusal):
        generate.main(["--model", str(tmp_path / "fp4"), "--adapter", str(adapter), "--prompt", "Hi"])
    monkeypatch.setattr(merge, "write_weights", lambda *a, **k: pytest.fail("merged before refusing"))
    with pytest.raises(merge.MergeError, match=refusal):
        merge.merge(str(tmp_path / "fp4"), adapter, tmp_path / "merged", progress=False)


def test_packed_weight_without_any_quant_state_entry_is_named(damaged):
    """A 4-bit weight whose quant_state entries are all gone is named as such (damage), where it was called a
    misshapen 16-bit weight of a shard that 'does not belong to this config.json'."""
    path, edit = damaged
    name = "model.layers.1.mlp.up_proj.weight"
    for entry in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        edit(f"{name}.{entry}", lambda tensor: None)
    with pytest.raises(ModelFolderError, match=rf"tensor {name} in .* holds the packed 4-bit codes of the config's "
                                               r"\[128, 64\] weight, but the checkpoint has none of its quant_state "
                                               r"entries.*download it again"):
        load_model(path, progress=False)
