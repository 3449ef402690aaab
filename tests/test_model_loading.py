"""The streaming 4-bit loader against transformers' own loading and bitsandbytes' own dequantization."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (ARCHS, DEVICE, MOE, ROOT, SUPPORTED, TOKENS, reference_model, refused_before_loading,
                      tiny_config)
from safetensors.torch import load_file, save_file

from builtin import tiny_checkpoint
from model_loading import ModelFolderError, load_model


def test_linear4bit_matches_dequantized_linear():
    """A 4-bit layer's forward and input gradient equal F.linear with bitsandbytes' dequantized weight."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              quant_storage=torch.bfloat16)
    layer.support_avx512bf16_for_cpu = False
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", quant_storage=torch.bfloat16, module=layer)._quantize(DEVICE)
    layer.bias = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16, device=DEVICE), requires_grad=False)
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x1 = (torch.randn(5, 128, device=DEVICE) / 128**0.5).to(torch.bfloat16).requires_grad_(True)  # outputs ~1
    x2 = x1.detach().clone().requires_grad_(True)
    grad_out = torch.randn(5, 64, dtype=torch.bfloat16, device=DEVICE)
    y1, y2 = layer(x1), F.linear(x2, w, layer.bias)
    (y1 * grad_out).sum().backward()
    (y2 * grad_out).sum().backward()
    # bit-exact on CPU; CUDA's matmul kernels may round a few bf16 ulps differently from F.linear's
    tol = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-2, atol=1e-2)
    assert x1.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", SUPPORTED + MOE)
def test_tiny_checkpoints_are_what_save_pretrained_writes(checkpoints, tmp_path, arch):
    """The tests' checkpoints (builtin.write_random_checkpoint) hold the tensors and config.json that transformers'
    own save_pretrained writes for the same model, name for name and bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ours = checkpoints(arch, "single")
    torch.manual_seed(1)  # the seed the fixture writes with: the same random weights
    AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.bfloat16).save_pretrained(tmp_path)
    theirs, written = load_file(tmp_path / "model.safetensors"), load_file(ours / "model.safetensors")
    assert written.keys() == theirs.keys() and all(torch.equal(written[k], theirs[k]) for k in theirs)
    assert json.loads((ours / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("layout", ["sharded", "single"])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_unquantized_logits_equal_from_pretrained(checkpoints, arch, layout):
    """With --quant none, the streamed model is transformers' from_pretrained model, logit for logit: the same bf16
    tensors in the same modules, run by the same kernels, so exactly. Each rotary inv_freq (Gemma 3 has one per
    attention type) is rebuilt in fp32, as transformers builds it."""
    path = checkpoints(arch, layout)
    ours = load_model(path, quant="none", device=DEVICE, progress=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(path)(TOKENS).logits, rtol=0, atol=0)
    inv_freqs = [b for name, b in ours.named_buffers() if name.endswith("inv_freq")]
    assert inv_freqs and all(b.dtype == torch.float32 for b in inv_freqs)


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_logits_equal_dense_model_with_dequantized_weights(checkpoints, arch):
    """With nf4, the model equals a dense bf16 model holding bitsandbytes' dequantization of each packed weight."""
    from bitsandbytes.functional import dequantize_4bit

    path = checkpoints(arch)
    ours = load_model(path, quant="nf4", device=DEVICE, progress=False).eval()
    ref = reference_model(path)
    n = 0
    for name, module in ours.named_modules():
        if type(module).__name__ == "Linear4bit":
            dense = dequantize_4bit(module.weight.data, module.weight.quant_state)
            ref.get_submodule(name).weight.data.copy_(dense)
            n += 1
    assert n == 7 * 2  # q k v o gate up down, in each of the 2 decoder layers; lm_head stays bf16
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours_logits, ref_logits = ours(TOKENS).logits, ref(TOKENS).logits
    torch.testing.assert_close(ours_logits, ref_logits, rtol=1e-2, atol=1e-2)
    assert all(not p.requires_grad for p in ours.parameters())


def test_fp4_differs_from_nf4_and_both_approximate_the_weights(checkpoints):
    from bitsandbytes.functional import dequantize_4bit

    path = checkpoints("llama")
    dense = reference_model(path).model.layers[0].mlp.up_proj.weight.float()
    errors = {}
    for quant in ("nf4", "fp4"):
        layer = load_model(path, quant=quant, device=DEVICE, progress=False).model.layers[0].mlp.up_proj
        assert layer.weight.quant_type == quant and layer.weight.quant_state.nested  # double quantization on
        w = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        errors[quant] = ((w - dense).norm() / dense.norm()).item()
    assert errors["nf4"] < 0.15 and errors["fp4"] < 0.25 and errors["nf4"] != errors["fp4"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad checkpoints: each a clear error naming the problem


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh copy of the sharded llama checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama"), dst)
    return dst


def shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_missing_shard_file(broken):
    shards(broken)[1].unlink()
    with pytest.raises(ModelFolderError, match="missing from"):
        load_model(broken, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard(broken, damage):
    shard = shards(broken)[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(ModelFolderError, match=rf"{shard.name} is truncated or corrupt"):
        load_model(broken, progress=False)


def test_missing_tensor(broken):
    shard = shards(broken)[0]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=rf"missing from the checkpoint.*{dropped}"):
        load_model(broken, progress=False)


def test_unexpected_tensor(broken):
    shard = shards(broken)[0]
    tensors = load_file(shard)
    tensors["model.layers.7.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=rf"unexpected tensor model.layers.7.mlp.extra.weight in {shard.name}"):
        load_model(broken, progress=False)


def test_shape_mismatch_names_tensor_and_file(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 192
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"tensor model\.layers\.\d\.mlp\.\w+_proj\.weight in model-.* "
                                               r"has shape"):
        load_model(broken, progress=False)


@pytest.mark.parametrize("model_type, message", [("not-a-model", "cannot read"), ("t5", "not a causal LM")])
def test_unknown_or_unsupported_architecture(broken, model_type, message):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = model_type
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=message):
        load_model(broken, progress=False)


@pytest.mark.parametrize("model_type, message", [
    ("not-a-model", r"cannot read .*config\.json \(model_type 'not-a-model'\) with transformers [\d.]+: .*"
                    r"Upgrade transformers .*or check model_type in config\.json"),
    ("t5", r"config\.json: model_type 't5' is not a causal LM transformers can build"),
])
def test_unknown_architecture_is_refused_before_the_data_is_tokenized(broken, tmp_path, monkeypatch, model_type,
                                                                      message):
    """A model_type transformers lacks, or cannot build as a causal LM, fails before tokenizing, naming config.json."""
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    with pytest.raises(ModelFolderError, match=message):
        refused_before_loading(monkeypatch, tmp_path, broken, tokenizes=False)


@pytest.mark.parametrize("damage, message", [
    ("remove", r"ckpt has no tokenizer \(none of tokenizer\.json, .*\): copy the base model's tokenizer files"),
    ("truncate", r"cannot load the tokenizer in .*ckpt \(.*\); if its files are damaged, copy the base model's"),
])
def test_folder_without_a_tokenizer_names_itself(broken, tmp_path, monkeypatch, damage, message):
    """A model folder without its tokenizer files, or with a damaged one: a ModelFolderError naming the folder."""
    for file in broken.glob("tokenizer*"):
        file.unlink() if damage == "remove" else file.write_text(file.read_text()[:100])
    with pytest.raises(ModelFolderError, match=message):
        refused_before_loading(monkeypatch, tmp_path, broken, tokenizes=True)


def test_folder_without_config_and_nonexistent_path(tmp_path):
    from model_loading import resolve_model_dir

    with pytest.raises(ModelFolderError, match="no config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ModelFolderError, match="no such folder"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_a_file_or_an_adapter_folder_as_model_is_named_as_such(tmp_path):
    """--model naming a file, or a run's adapter folder (a newcomer's mix-up with --adapter), says what it is and
    what to pass instead, not only that config.json is missing."""
    from model_loading import resolve_model_dir

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFolderError) as e:
        resolve_model_dir(str(tmp_path / "model.safetensors"))
    assert str(e.value) == (f"--model {tmp_path / 'model.safetensors'} is a file: point --model at the Hugging Face "
                            "model folder holding it (config.json and safetensors weights)")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
    with pytest.raises(ModelFolderError) as e:
        resolve_model_dir(str(tmp_path / "run"))
    assert str(e.value) == (f"--model {tmp_path / 'run'} is an adapter folder (adapter_config.json), not a model: "
                            "pass its base, 'tiny', as --model (merge.py and generate.py take this folder as "
                            "--adapter)")


def test_offline_hub_download_says_so(tmp_path, monkeypatch):
    """Hub ids go through huggingface_hub into HF_HOME; offline and uncached is a clear error, not a stack of retries."""
    import huggingface_hub.constants

    from model_loading import resolve_model_dir

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelFolderError, match="HF_HUB_OFFLINE"):
        resolve_model_dir("some-org/some-model")


# ---------------------------------------------------------------------------------------------------------------------
# The built-in model's cache folder


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """file name -> bytes of the built-in model, built by one process alone."""
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny-cache"))
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def folder_files(folder):
    return {f.name: f.read_bytes() for f in folder.iterdir()}


@pytest.mark.parametrize("left", ["tokenizer only", "config without weights", "one shard missing"])
def test_incomplete_builtin_model_folder_is_rebuilt(tiny_reference, tmp_path, left):
    """An incomplete folder in the cache (a crashed build, or a rank that wrote only the tokenizer) is rebuilt, and a
    killed build's temporary folder is removed."""
    folder = tmp_path / "tiny-llama-v2"
    folder.mkdir()
    (tmp_path / ".tmp-tiny-llama-v2-killed").mkdir()
    kept = {"tokenizer only": ["tokenizer.json", "tokenizer_config.json"],
            "config without weights": ["config.json", "tokenizer.json", "tokenizer_config.json"],
            "one shard missing": [n for n in tiny_reference if n != "model-00003-of-00006.safetensors"]}[left]
    for name in kept:
        (folder / name).write_bytes(tiny_reference[name])
    assert tiny_checkpoint(tmp_path) == folder
    assert folder_files(folder) == tiny_reference
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tiny-llama-v2"]


BUILD_IN_PROCESS_GROUP = """
import datetime, pathlib, sys
import torch.distributed as dist
import builtin
rank, init, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
print(builtin.tiny_checkpoint(pathlib.Path(cache)))
dist.destroy_process_group()
"""


def test_two_ranks_building_at_once_leave_one_complete_folder(tiny_reference, tmp_path):
    """Two ranks of a gloo process group build the built-in model into one empty cache at once: both get the folder
    one process alone builds, and no temporary folder is left."""
    cache, init = tmp_path / "cache", f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_IN_PROCESS_GROUP, str(rank), init, str(cache)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == [str(cache / "tiny-llama-v2")] * 2
    assert folder_files(cache / "tiny-llama-v2") == tiny_reference
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["tiny-llama-v2"]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="tensors are staged through page-locked buffers only on their way to a GPU")
def test_tensors_copied_to_the_gpu_by_several_threads_are_the_files_bytes(checkpoints):
    """Three threads, chunks of 1,000 bytes (every tensor in several, the two buffers of a thread in turn): every
    tensor arrives on the GPU bit for bit, in the files' order, with its dtype and shape."""
    import model_loading
    import shard_reader

    path = checkpoints("gemma", "single")
    entries = model_loading.index_weights(path)
    by_file = {}
    for name, entry in entries.items():
        by_file.setdefault(entry.file, []).append(name)
    arrived = list(shard_reader.read_ahead(by_file, {name: DEVICE for name in entries}, threads=3, chunk_bytes=1000))
    assert [name for name, _ in arrived] == [name for names in by_file.values() for name in names]
    expected = load_file(next(iter(by_file)))
    assert max(t.numel() * t.element_size() for t in expected.values()) > 2 * 3 * 1000
    for name, tensor in arrived:
        assert tensor.device.type == "cuda" and tensor.dtype == expected[name].dtype
        assert tensor.shape == expected[name].shape
        assert torch.equal(tensor.cpu().reshape(-1).view(torch.uint8), expected[name].reshape(-1).view(torch.uint8))
