"""Mixture-of-experts models: transformers keeps each layer's experts fused in 3-D parameters, save_pretrained writes
them one per expert; the loader reads either layout and builds transformers' own model."""
import json

import pytest
import torch
from conftest import (DEVICE, MOE, SHAPE, TOKENS, adapted, common, editable_copy, losses, make_adapter,
                      randomize_b, reference_model, run_inprocess, run_torchrun, tiny_config)
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
# The dense architectures' own checks, run on the mixtures of experts too (see "The four checks" below); imported
# under names pytest does not collect a second time
from test_lora import test_peft_loads_our_adapter_with_same_logits as peft_loads_our_adapter
from test_training import test_first_step_loss_is_the_models_own_loss as first_step_loss
from transformers import AutoModelForCausalLM

import benchmark
import generate
import lora
import merge
import model_loading
import quantization
import quantize
import train
from builtin import make_tokenizer, write_random_checkpoint
from model_loading import CheckpointError, load_model, quantized_weights


def experts_modules(model):
    """The experts module of each MoE block (Mixtral's, Qwen's and OLMoE's `mlp`, GraniteMoE's `block_sparse_moe`)."""
    return [m.experts for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]


@pytest.mark.parametrize("arch", MOE)
def test_tiny_moe_configs_route_tokens_to_several_experts(checkpoints, arch):
    """Each tiny MoE routes: every layer sends TOKENS' tokens to all 4 experts, 2 per token, in different pairs."""
    model, picked = reference_model(checkpoints(arch, "single")), []
    # every transformers 5 experts module is called as experts(hidden_states, top_k_index, top_k_weights)
    hooks = [e.register_forward_pre_hook(lambda m, args: picked.append(args[1])) for e in experts_modules(model)]
    with torch.no_grad():
        model(TOKENS)
    for hook in hooks:
        hook.remove()
    assert len(picked) == 2
    for indices in picked:  # (tokens, top_k)
        assert indices.shape[1] == 2 and set(indices.flatten().tolist()) == {0, 1, 2, 3}
        assert len({tuple(sorted(pair)) for pair in indices.tolist()}) > 2


@pytest.fixture(scope="module")
def fused_checkpoint(tmp_path_factory):
    """Mixtral's experts as its state_dict holds them, fused (3-D): the layout of writers other than save_pretrained."""
    out = tmp_path_factory.mktemp("mixtral-fused")
    write_random_checkpoint(tiny_config("mixtral"), out, "1GB", seed=1, tokenizer=make_tokenizer())
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"), dtype=torch.bfloat16)
    (out / "model.safetensors").unlink()
    save_torch_state_dict(model.state_dict(), out, max_shard_size="1GB", metadata={"format": "pt"})
    return out


def assert_logits_equal_from_pretrained(path):
    ours = load_model(path, quant="none", device=DEVICE, progress=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(path)(TOKENS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["sharded", "single"])
@pytest.mark.parametrize("arch", MOE)
def test_moe_unquantized_logits_equal_from_pretrained(checkpoints, arch, layout):
    """--quant none gives transformers' from_pretrained logits exactly, from experts as save_pretrained writes them,
    across 40KB shards or in one file: one per expert, or for GraniteMoE fused under its original names
    (input_linear, output_linear)."""
    path = checkpoints(arch, layout)
    names = model_loading.index_checkpoint(path)
    assert not any("gate_up_proj" in n for n in names)
    assert any(".experts.3." in n for n in names) or "model.layers.0.block_sparse_moe.input_linear.weight" in names
    assert_logits_equal_from_pretrained(path)


def test_fused_experts_load_too(fused_checkpoint):
    """Experts stored fused, as the model holds them, load into the same model."""
    assert "model.layers.0.mlp.experts.gate_up_proj" in model_loading.index_checkpoint(fused_checkpoint)
    assert_logits_equal_from_pretrained(fused_checkpoint)


def test_experts_are_fused_one_layer_at_a_time(checkpoints, monkeypatch):
    """Fusing holds no more than one layer's experts: its gate_up_proj and down_proj are made as soon as their last
    expert has been read, before the next layer's experts arrive."""
    path, events = checkpoints("qwen3_moe"), []
    read = model_loading.read_ahead

    def recording(*args, **kwargs):
        for name, tensor in read(*args, **kwargs):
            events.append(("read", name))
            yield name, tensor

    put = model_loading._put
    monkeypatch.setattr(model_loading, "read_ahead", recording)
    monkeypatch.setattr(model_loading, "_put", lambda model, name, *a: (events.append(("put", name)),
                                                                         put(model, name, *a)))
    load_model(path, quant="none", device=DEVICE, progress=False)
    held, most = 0, 0
    for kind, name in events:
        if ".experts." in name:
            held = held + 1 if kind == "read" else 0
            most = max(most, held)
    assert most <= 3 * 4  # gate, up and down of 4 experts
    assert sum(kind == "put" and name.endswith("experts.gate_up_proj") for kind, name in events) == 2


@pytest.fixture
def broken_moe(checkpoints, tmp_path):
    """The single-file Mixtral checkpoint, to damage."""
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("mixtral", "single"), dst)
    return dst


def test_missing_expert_is_named_before_any_data_is_read(broken_moe, monkeypatch):
    """A checkpoint that lacks one expert's tensor is refused naming it, from the headers: no tensor is read."""
    file = broken_moe / "model.safetensors"
    tensors = load_file(file)
    dropped = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del tensors[dropped]
    save_file(tensors, file, metadata={"format": "pt"})
    monkeypatch.setattr(model_loading, "read_ahead", lambda *a, **k: pytest.fail("read tensor data"))
    with pytest.raises(CheckpointError, match=rf"{dropped} is missing from the checkpoint.*layers\.1\.mlp\.experts"
                                              r"\.down_proj"):
        load_model(broken_moe, quant="none", progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Experts in 4 bits


@pytest.mark.parametrize("arch", MOE)
def test_nf4_experts_equal_transformers_with_dequantized_weights(checkpoints, arch):
    """With nf4, the experts' 3-D tensors are packed too, and the model equals transformers' own holding bitsandbytes'
    dequantization of every 4-bit weight, experts included; the routers stay bf16, frozen."""
    path = checkpoints(arch)
    ours = load_model(path, quant="nf4", device=DEVICE, progress=False).eval()
    ref = reference_model(path)
    shells = quantization.packed_shells(ours)
    assert len(shells) == 4 and {name.split(".experts.")[1] for name in shells} == {"down_proj", "gate_up_proj"}
    assert quantized_weights(ours) >= shells.keys()
    with torch.no_grad():
        for name, shell in shells.items():
            assert shell.weight.dtype == quantization.STORAGE and shell.weight.numel() * 4 == shell().numel()
            ref.get_parameter(name).copy_(shell())
        for name, module in ours.named_modules():
            if quantization.is_4bit(module):
                ref.get_submodule(name).weight.copy_(quantization.dequantize(module.weight, module))
        # On a GPU bitsandbytes' kernels and cuBLAS round otherwise: PhiMoE's logits differed by up to 0.021 (an H200)
        tol = 1e-2 if DEVICE.type == "cpu" else 3e-2
        torch.testing.assert_close(ours(TOKENS).logits, ref(TOKENS).logits, rtol=tol, atol=tol)
    # The routers: a bare weight (gate or router) in every block, or a linear (PhiMoE's; Qwen2-MoE's
    # shared_expert_gate beside its bare gate)
    bare = [p for name, p in ours.named_parameters() if name.endswith((".gate.weight", ".router.weight"))]
    assert len(bare) == 2 and all(p.dtype == torch.bfloat16 and p.dim() == 2 for p in bare)
    routers = model_loading.moe_routers(ours)
    assert len(routers) == (2 if arch in ("qwen2_moe", "phimoe") else 0)
    assert all(isinstance(ours.get_submodule(name), torch.nn.Linear) for name in routers)
    assert all(not p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_trains_in_4bit(checkpoints, tmp_path, arch):
    """train.py on an MoE model, experts in nf4 (the default): 2 steps with finite losses, and LoRA on the attention
    (and Qwen2-MoE's shared-expert) linears learns: every B moved off zero; the routers get none."""
    history = run_inprocess(common(checkpoints(arch), tmp_path, steps=2))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(losses(history))))
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b and all(v.abs().max() > 0 for v in b.values())
    assert not any(".gate." in k or "experts" in k for k in adapter)
    assert any("shared_expert." in k for k in adapter) == (arch == "qwen2_moe")


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_moe_two_ranks_match_one_rank(checkpoints, tmp_path):
    """The packed experts shard with the rest of their decoder layer, and LoRA on them (--lora_targets
    all-linear,experts) with the layer's other LoRA weights: 2 ranks of batch 4 (torchrun) give the losses of 1
    process of batch 8, Mixtral in nf4, and the same adapter up to bf16 noise."""
    path, flags = checkpoints("mixtral"), ["--lora_targets", "all-linear,experts"]
    two = run_torchrun(common(path, tmp_path / "two", steps=2) + flags + ["--batch_size", "4"], nproc=2)
    one = run_inprocess(common(path, tmp_path / "one", steps=2) + flags + ["--batch_size", "8"])
    torch.testing.assert_close(losses(two), losses(one), rtol=5e-3, atol=0)
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("two", "one"))
    assert a.keys() == b.keys() and sum(".experts." in k for k in a) == 8
    # Adam's first steps are about lr * sign(gradient): a few near-zero gradients flip sign under other bf16 sums, in
    # the experts' factors as in the linears' (seen on Qwen3-MoE: up to 4.5% and 7.3% of the norm)
    for key in a:
        assert (a[key] - b[key]).norm() <= 0.1 * b[key].norm(), key


def test_quantize_py_keeps_experts_bf16_as_transformers_does(checkpoints, tmp_path):
    """quantize.py on Mixtral writes the linears in 4 bits and the experts one per expert in bf16, as transformers'
    own bitsandbytes quantization saves them; transformers loads the folder with the logits we load from it."""
    out = tmp_path / "q"
    quantize.main(["--model", str(checkpoints("mixtral")), "--out", str(out)])
    stored = model_loading.index_checkpoint(out)
    assert stored["model.layers.0.block_sparse_moe.experts.3.w1.weight"].dtype == "BF16"
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in stored
    ours = load_model(out, quantization.AUTO, DEVICE, progress=False).eval()
    assert not quantization.packed_shells(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(out)(TOKENS).logits, rtol=0, atol=0)


def test_transformers_4bit_moe_checkpoint_loads_as_saved(checkpoints, tmp_path):
    """A Qwen2-MoE that transformers quantized with bitsandbytes and saved (experts one per expert in bf16, every
    linear 4-bit, shared_expert_gate too) loads with its packed weights as stored: the logits of transformers' own
    model from the folder, exactly."""
    from transformers import BitsAndBytesConfig

    src = checkpoints("qwen2_moe")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.bfloat16,
                                         device_map="cpu").save_pretrained(tmp_path, max_shard_size="40KB")
    model_loading.copy_beside(src, tmp_path)
    ours = load_model(tmp_path, quantization.AUTO, DEVICE, progress=False).eval()
    assert quantization.is_4bit(ours.model.layers[0].mlp.shared_expert_gate) and not quantization.packed_shells(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, reference_model(tmp_path)(TOKENS).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Experts pre-quantized too (quantize.py --quantize_experts): the bytes the loader makes from the 16-bit original


@pytest.fixture(scope="module")
def experts_4bit(checkpoints, tmp_path_factory):
    """arch -> quantize.py --quantize_experts of its sharded checkpoint (40KB shards: experts one per expert)."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"{arch}-experts-nf4") / "q"
            quantize.main(["--model", str(checkpoints(arch)), "--out", str(made[arch]), "--quantize_experts"])
        return made[arch]

    return get


def raw(tensor):
    """Packed codes viewed as bf16 hold NaN patterns, which torch.equal finds unequal to themselves: their bytes."""
    return tensor.detach().cpu().reshape(-1).view(torch.uint8)


def state_of(module):
    """Every tensor of a 4-bit module's quant_state (its nested statistics' too), by owner and attribute."""
    return {(type(owner).__name__, id(owner) != id(module.quant_state), key): t
            for owner, key, t in quantization.state_tensors(module)}


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_quantize_experts_stores_the_bytes_the_loader_makes(checkpoints, experts_4bit, tmp_path, monkeypatch, arch):
    """--quantize_experts writes each layer's experts fused, under the model's names, as 4-bit bytes and quant_state;
    loaded, with nothing quantized, every packed weight (experts and linears) and quant_state tensor is bit for bit
    what the loader quantizes from the 16-bit original, and the logits are equal exactly. The folder is smaller
    than without the flag, and the host-memory estimate from its headers covers what the model holds."""
    src, out = checkpoints(arch), experts_4bit(arch)
    stored = model_loading.index_checkpoint(out)
    assert not any(".experts.0." in n or "block_sparse_moe" in n for n in stored)
    for stat in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"):
        assert f"model.layers.1.mlp.experts.gate_up_proj{stat}" in stored
    quantize.main(["--model", str(src), "--out", str(tmp_path / "bf16-experts")])
    without = model_loading.index_checkpoint(tmp_path / "bf16-experts")
    experts_bytes = [sum(e.nbytes for n, e in entries.items() if ".experts." in n) for entries in (stored, without)]
    assert experts_bytes[0] < 0.3 * experts_bytes[1]  # 4 bits and a byte of absmax per 64 weights, against 16 bits
    assert sum(e.nbytes for e in stored.values()) < sum(e.nbytes for e in without.values()) - experts_bytes[0]
    direct = load_model(src, "nf4", DEVICE, progress=False).eval()
    with monkeypatch.context() as m:
        m.setattr(quantization, "quantize", lambda *a, **k: pytest.fail("quantized a pre-quantized weight"))
        ours = load_model(out, quantization.AUTO, DEVICE, progress=False).eval()
    shells = quantization.packed_shells(ours)
    assert shells.keys() == quantization.packed_shells(direct).keys() and len(shells) == 4
    four_bit = {n: m for n, m in ours.named_modules()
                if quantization.is_4bit(m) or isinstance(m, quantization.Packed4bit)}
    assert len(four_bit) == 12
    for name, module in four_bit.items():
        theirs = direct.get_submodule(name)
        assert torch.equal(raw(module.weight), raw(theirs.weight)), name
        mine, want = state_of(module), state_of(theirs)
        assert mine.keys() == want.keys() and len(mine) >= 4, name
        assert all(torch.equal(mine[k], want[k]) for k in mine), name
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, direct(TOKENS).logits, rtol=0, atol=0)
    held = sum(p.nbytes for p in ours.parameters()) + sum(t.nbytes for m in four_bit.values()
                                                          for _, _, t in quantization.state_tensors(m))
    estimate = model_loading.host_bytes(model_loading.plan_load(out, quantization.AUTO))
    assert held <= estimate <= held + len(four_bit) * 200, (held, estimate)


def test_transformers_refuses_packed_experts(experts_4bit):
    """from_pretrained does not load a --quantize_experts folder as something else: the packed experts' shapes are
    not the ones its model declares, and it refuses them (the README's promise that only our tools read it)."""
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(experts_4bit("qwen3_moe"))


# The logits of the same weights, dense against 4-bit: exactly on the CPU; on a GPU, bitsandbytes' matmul of its 4-bit
# linears rounds otherwise than F.linear on their dequantized copies (up to 5e-3 apart on an H200)
DENSE_AS_4BIT = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=1e-2)


def test_quant_none_dequantizes_packed_experts(experts_4bit):
    """--quant none on such a checkpoint: each experts tensor is a dense (experts, out, in) bf16 parameter, exactly
    bitsandbytes' dequantization of the stored bytes, and the logits are the 4-bit model's."""
    path = experts_4bit("qwen3_moe")
    dense = load_model(path, "none", DEVICE, progress=False).eval()
    packed = load_model(path, quantization.AUTO, DEVICE, progress=False).eval()
    assert not quantization.packed_shells(dense)
    for name, shell in quantization.packed_shells(packed).items():
        weight = dense.get_parameter(name)
        assert weight.dtype == torch.bfloat16 and tuple(weight.shape) == shell.shape
        assert torch.equal(weight, quantization.dequantize(shell.weight, shell)), name
    with torch.no_grad():
        torch.testing.assert_close(dense(TOKENS).logits, packed(TOKENS).logits, **DENSE_AS_4BIT)


def test_train_and_merge_on_packed_experts(checkpoints, experts_4bit, tmp_path):
    """train.py --lora_targets all-linear,experts trains 2 steps on Mixtral with packed experts (every expert B moves);
    merge.py of that adapter writes, once from_pretrained has read both, the tensors it writes from the 16-bit
    original (whose experts it quantizes as the loader does), bit for bit; generate.py applies it with the same logits
    on either base."""
    base = experts_4bit("mixtral")
    history = run_inprocess(common(base, tmp_path / "run", steps=2) + ["--lora_targets", "all-linear,experts"])
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(losses(history))))
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if ".experts." in k and "lora_B" in k}
    assert len(b) == 4 and all(v.abs().max() > 0 for v in b.values())
    for name, model in (("packed", base), ("original", checkpoints("mixtral"))):
        merge.merge(str(model), tmp_path / "run", tmp_path / name, verify=False, progress=False)
    merged, expected = (reference_model(tmp_path / name).state_dict() for name in ("packed", "original"))
    assert merged.keys() == expected.keys() and sum(".experts." in k for k in merged) == 4
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    (on_packed, _), (on_original, _) = (generate.load(str(m), str(tmp_path / "run"), None, DEVICE)
                                        for m in (base, checkpoints("mixtral")))
    assert quantization.packed_shells(on_packed)
    with torch.no_grad():
        torch.testing.assert_close(on_packed(TOKENS).logits, on_original(TOKENS).logits, rtol=0, atol=0)


@pytest.fixture
def damaged_experts(experts_4bit, tmp_path):
    """A copy of Mixtral's packed-experts checkpoint, and edit(name, change) (conftest.editable_copy)."""
    return editable_copy(experts_4bit("mixtral"), tmp_path / "ckpt")


@pytest.mark.parametrize("name, change, message", [
    ("model.layers.1.mlp.experts.down_proj.absmax", lambda tensor: None,
     r"model\.layers\.1\.mlp\.experts\.down_proj\.absmax is missing from the checkpoint"),
    ("model.layers.0.mlp.experts.gate_up_proj", lambda tensor: tensor[:100],
     r"tensor model\.layers\.0\.mlp\.experts\.gate_up_proj in .* holds \[100, 1\] BF16 of packed 4-bit codes, but "
     r"the config's \[4, 256, 64\] weight packs into \(32768, 1\) bytes"),
], ids=["absmax-missing", "too-few-bytes"])
def test_damaged_packed_experts_are_named(damaged_experts, name, change, message):
    """A packed experts tensor whose absmax is missing, or with too few bytes, is refused as a linear's is: naming
    the tensor and, for the bytes, the shape they should pack."""
    path, edit = damaged_experts
    edit(name, change)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, progress=False)


def test_quantize_experts_needs_them_fused(checkpoints, tmp_path):
    """write_4bit(quantize_experts=True) given the experts one per expert, as save_pretrained writes them, refuses
    rather than leave them in bf16 unsaid, and writes no folder."""
    path = checkpoints("qwen3_moe", "single")
    config = model_loading.read_config(path)
    tensors = load_file(path / "model.safetensors").items()
    with pytest.raises(quantize.QuantizeError, match=r"model\.layers\.0\.mlp\.experts\.down_proj did not arrive "
                                                     r"as one fused tensor.*conversions\.fuse"):
        quantize.write_4bit(config, tensors, tmp_path / "q", progress=False, quantize_experts=True)
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------------------------------------
# LoRA on the experts (--lora_targets all-linear,experts), in PEFT's target_parameters format

EXPERT_TARGETS = (lora.ALL_LINEAR, lora.EXPERTS)


# The mixtures of experts that pass the four checks of the supported architectures (README, Architectures)
CHECKED = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.mark.parametrize("arch", CHECKED)
def test_expert_lora_equals_peft(checkpoints, tmp_path, arch):
    """Our LoRA on the linears and the experts (random B, --quant none), saved, is what PEFT 0.21 loads onto
    transformers' own model: the same keys, none missing or unexpected, and the same logits. Compared in fp32: in
    bf16 the tiny random routers have near-ties (two experts' logits 1e-3 apart), and which of the two a token takes
    then follows bf16's rounding, which differs between the two ways of computing the same update."""
    from peft import PeftModel, get_peft_model_state_dict

    path = checkpoints(arch, "single")
    ours, names = adapted(path, targets=EXPERT_TARGETS)
    assert sum(".experts." in n for n in names) == 4
    randomize_b(ours)
    with torch.no_grad():  # larger on the experts, so that their part of the logits stands well above bf16 noise
        for module in lora.lora_modules(ours).values():
            if isinstance(module, lora.ExpertsLoRA):
                module.lora_B.weight.mul_(5)
    lora.save_adapter(lora.factor_weights(lora.lora_modules(ours)), tmp_path, r=4, alpha=8.0, dropout=0.0,
                      base_model=str(path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # PEFT nests a wrapper per parameter in declared order: gate_up_proj inside, down_proj outside
    experts = "base_model.model.model.layers.0.mlp.experts"
    inter = 64 if arch.startswith("qwen") else 128  # moe_intermediate_size, or the dense width
    assert saved[f"{experts}.base_layer.lora_A.weight"].shape == (4 * 4, 64)  # gate_up_proj: (r * experts, hidden)
    assert saved[f"{experts}.base_layer.lora_B.weight"].shape == (2 * inter, 4 * 4)
    assert saved[f"{experts}.lora_A.weight"].shape == (4 * 4, inter)  # down_proj
    peft = PeftModel.from_pretrained(reference_model(path), tmp_path).eval()
    theirs = get_peft_model_state_dict(peft)
    assert theirs.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(theirs[key].float().cpu(), value, rtol=0, atol=0 if theirs[key].dtype == torch.float32
                                   else value.abs().max().item() / 128)
    peft.float(), ours.float()
    with torch.no_grad():
        want, base = peft(TOKENS).logits, reference_model(path).float()(TOKENS).logits
        got = ours(TOKENS).logits
        for module in lora.lora_modules(ours).values():
            if isinstance(module, lora.ExpertsLoRA):
                module.scaling = 0.0
        without_experts = ours(TOKENS).logits.float()
    assert (want - base).abs().max() > 0.1 and (without_experts - got).abs().max() > 0.1  # the experts' LoRA counts
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,r", [(torch.float32, 4), (torch.bfloat16, 8), (torch.bfloat16, 4)])
@pytest.mark.parametrize("arch", MOE)
def test_expert_lora_on_the_tokens_is_the_merged_weights_forward(checkpoints, monkeypatch, arch, dtype, r):
    """LoRA applied to each expert's routed tokens (lora._grouped_forward: the grouped kernel at r=8 in bf16, expert
    by expert otherwise) computes what the class's own forward computes with W_e + s B_e A_e as its weights: the same
    output and the same gradients for the input, A and B (fp32: to rounding; bf16: to bf16 tolerance)."""
    model, _ = adapted(checkpoints(arch, "single"), r=r, targets=(lora.EXPERTS,))
    experts = experts_modules(model.to(dtype))[0]
    assert lora._groups_by_expert(experts)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in experts.lora_experts.values():
            adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g))
    hidden = torch.randn(24, SHAPE["hidden_size"], generator=g).to(DEVICE, dtype)
    top_k_index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(24)]).to(DEVICE)
    top_k_weights = torch.rand(24, 2, generator=g).to(DEVICE, dtype)
    factors = [p for adapter in experts.lora_experts.values() for p in adapter.parameters()]

    def run(forward):
        x = hidden.clone().requires_grad_()
        out = forward(x)
        out.float().square().sum().backward()
        grads = [x.grad] + [p.grad for p in factors]
        for p in factors:
            p.grad = None
        return [out] + grads

    def merged(x):
        weights = {name: getattr(experts, name) + adapter.update(dtype)
                   for name, adapter in experts.lora_experts.items()}
        return quantization.forward_with(experts, weights, x, top_k_index, top_k_weights)

    got, want = run(lambda x: experts(x, top_k_index, top_k_weights)), run(merged)
    monkeypatch.setattr(lora, "_groups_by_expert", lambda experts: False)  # an experts class transformers does not
    fallback = run(lambda x: experts(x, top_k_index, top_k_weights))  # describe: the merged weights, in its forward
    for ours, theirs in zip(fallback, want):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert want[0].abs().max() > 0 and all(w.abs().max() > 0 for w in want)
    for ours, theirs in zip(got, want):
        torch.testing.assert_close(ours.float() / theirs.abs().max(), theirs.float() / theirs.abs().max(), **tol)


def test_expert_lora_round_trips_exactly(checkpoints, tmp_path):
    """save_adapter -> load_adapter into a freshly injected model (another seed) gives back every factor exactly;
    generate.py applies the adapter (lora.apply_adapter) to the same logits."""
    path = checkpoints("qwen3_moe", "single")
    first, _ = adapted(path, targets=EXPERT_TARGETS)
    randomize_b(first)
    state = lora.factor_weights(lora.lora_modules(first))
    lora.save_adapter(state, tmp_path, r=4, alpha=8.0, dropout=0.0, base_model=str(path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    torch.manual_seed(123)
    second, _ = adapted(path, targets=EXPERT_TARGETS)
    lora.load_adapter(second, tmp_path)
    loaded = lora.factor_weights(lora.lora_modules(second))
    assert loaded.keys() == state.keys() and any(".lora_experts." in k for k in state)
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    as_generated, _ = generate.load(str(path), str(tmp_path), "none", DEVICE)  # lora.apply_adapter: r, alpha, targets
    with torch.no_grad():
        torch.testing.assert_close(as_generated(TOKENS).logits, first(TOKENS).logits, rtol=0, atol=0)


def test_expert_lora_alone_equals_peft(checkpoints, tmp_path):
    """--lora_targets experts alone: adapter_config.json has target_modules null (PEFT's "none asked"), and PEFT
    loads the adapter with our keys and logits."""
    from peft import PeftModel, get_peft_model_state_dict

    path = checkpoints("qwen3_moe", "single")
    ours, names = adapted(path, targets=(lora.EXPERTS,))
    assert len(names) == 4 and all(".experts." in n for n in names)
    randomize_b(ours)
    lora.save_adapter(lora.factor_weights(lora.lora_modules(ours)), tmp_path, r=4, alpha=8.0, dropout=0.0,
                      base_model=str(path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] is None
    peft = PeftModel.from_pretrained(reference_model(path), tmp_path).eval()
    assert get_peft_model_state_dict(peft).keys() == load_file(tmp_path / "adapter_model.safetensors").keys()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, peft(TOKENS).logits, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_expert_lora_trains_on_nf4_experts(checkpoints, tmp_path, arch):
    """train.py --lora_targets all-linear,experts on a 4-bit MoE base: 2 steps move every expert LoRA B off zero,
    and the adapter saved holds PEFT's expert keys beside the linears'."""
    history = run_inprocess(common(checkpoints(arch), tmp_path, steps=2) + ["--lora_targets", "all-linear,experts"])
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(losses(history))))
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if ".experts." in k and "lora_B" in k}
    assert len(b) == 4 and all(v.abs().max() > 0 for v in b.values())
    assert any(".self_attn." in k for k in adapter)


def test_expert_lora_refuses_dropout(checkpoints):
    """Dropout cannot apply to an update of the experts' weights (PEFT refuses such adapters): train.py refuses it
    with its flags, and inject_lora too."""
    path = checkpoints("mixtral", "single")
    with pytest.raises(ValueError, match="lora_dropout 0"):
        train.parse_config(["--model", str(path), "--lora_targets", "all-linear,experts", "--lora_dropout", "0.1"])
    model = load_model(path, quant="none", device=DEVICE, progress=False)
    with pytest.raises(ValueError, match="lora_dropout 0"):
        lora.inject_lora(model, list(EXPERT_TARGETS), model_loading.decoder_layer_class(model), 4, 8.0, 0.1, DEVICE)


def test_expert_lora_resumes_bit_for_bit(checkpoints, tmp_path):
    """A run with expert LoRA resumed from checkpoint-2 (the newer one damaged) continues with the uninterrupted
    run's losses exactly: load_adapter puts the experts' factors back, and their optimizer state follows them."""
    args = common(checkpoints("qwen3_moe"), tmp_path, steps=4) + ["--lora_targets", "all-linear,experts",
                                                                  "--save_every", "2"]
    first = run_inprocess(args)
    optimizer_file = tmp_path / "checkpoint-4" / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    again = run_inprocess(args + ["--resume", "auto"])
    assert [h["step"] for h in again] == [3, 4] and losses(again) == losses(first)[2:]


def test_expert_lora_joins_its_layers_adapters_unit(checkpoints):
    """fsdp_wrap.group_adapters moves every expert A and B, fp32 and trainable, into its decoder layer's
    LayerAdapters (one FSDP unit with the layer's other LoRA weights); the layer's own tree keeps only frozen weights."""
    import fsdp_wrap

    model = load_model(checkpoints("mixtral", "single"), quant="nf4", device=DEVICE, progress=False)
    layer_cls = model_loading.decoder_layer_class(model)
    lora.inject_lora(model, list(EXPERT_TARGETS), layer_cls, 4, 8.0, 0.0, DEVICE)
    fsdp_wrap.group_adapters(model, layer_cls)
    units = [m for m in model.modules() if isinstance(m, fsdp_wrap.LayerAdapters)]
    assert len(units) == 2
    for unit in units:
        keys = set(unit.adapters)
        assert {f"mlp-experts-lora_experts-{t}-lora_{ab}" for t in ("gate_up_proj", "down_proj") for ab in "AB"} <= keys
        assert all(p.requires_grad and p.dtype == torch.float32 for p in unit.adapters.parameters())
        assert not any(p.requires_grad for p in unit._adapters_wrapped_module.parameters())



# ---------------------------------------------------------------------------------------------------------------------
# The four checks of every supported architecture (README, Architectures), on the mixtures of experts. The first,
# --quant none logits equal from_pretrained's, is test_moe_unquantized_logits_equal_from_pretrained above.


@pytest.mark.parametrize("arch", CHECKED)
def test_moe_first_step_loss_is_the_models_own_loss(checkpoints, process_group, arch):
    """The dense architectures' check (test_training): step 1's loss on the model train.py builds (16-bit base, LoRA
    with B = 0, sharded and checkpointed) is transformers' own forward(labels=...) loss, to 1e-6."""
    first_step_loss(checkpoints, process_group, arch)


def peft_adapted(model) -> tuple[set[str], set[str]]:
    """What PEFT adapts in `model`: its LoRA linears by path, and the parameters its ParamWrappers adapt, by name
    (a second parameter of a module wraps the first one's wrapper, at "<module>.base_layer")."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    linears, params = set(), set()
    for name, module in model.named_modules():
        path = name.removeprefix(lora.PEFT_PREFIX).replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            params.add(f"{path}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            linears.add(path)
    return linears, params


@pytest.mark.parametrize("arch", CHECKED)
def test_moe_default_targets_are_every_linear_but_the_routers(checkpoints, arch):
    """The default targets adapt every linear that PEFT's "all-linear" adapts in transformers' model but the routers
    among them (Qwen2-MoE's shared_expert_gate, an nn.Linear to 1), and exactly the linears the loader makes 4-bit;
    the routers stay bf16 and frozen. `experts` adds exactly the experts' 3-D tensors, which the loader packs in 4
    bits. PEFT 0.21's "all-linear" takes more on Mixtral, Qwen3-MoE and OLMoE, whose experts and router were linears
    in transformers 4: the experts' tensors (gate_up_proj at twice the rank) and the router's bare weight."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import ParamWrapper

    path = checkpoints(arch)
    skeleton = model_loading.build_skeleton(model_loading.read_config(path), "nf4")
    layer_cls = model_loading.decoder_layer_class(skeleton)
    ours = lora.matching_modules(skeleton, train.Config.lora_targets, layer_cls)
    peft_model = get_peft_model(reference_model(path), LoraConfig(r=4, target_modules="all-linear"))
    linears, params = peft_adapted(peft_model)
    routers = model_loading.moe_routers(skeleton)
    assert len(routers) == (2 if arch == "qwen2_moe" else 0) and routers <= linears
    assert set(ours) == linears - routers
    assert set(ours) == {n for n, m in skeleton.named_modules() if quantization.is_4bit(m)}
    assert all(type(skeleton.get_submodule(n)) is torch.nn.Linear for n in routers)  # bf16, as transformers built it
    experts = lora.expert_tensors(skeleton, layer_cls)
    assert len(experts) == 4 and experts.keys() == quantization.packed_shells(skeleton).keys()
    bare_routers = {f"{name.rpartition('.experts.')[0]}.gate.weight" for name in experts}
    assert params == (set() if arch == "qwen2_moe" else experts.keys() | bare_routers)
    doubled = [m for m in peft_model.modules() if isinstance(m, ParamWrapper) and m.parameter_name == "gate_up_proj"]
    assert all(m.r["default"] == 8 for m in doubled) and len(doubled) == len(params) // 3


@pytest.mark.parametrize("arch", CHECKED)
def test_moe_peft_loads_our_adapter_with_same_logits(checkpoints, tmp_path, arch):
    """The dense architectures' check (test_lora) on the default targets: PEFT loads our adapter with no missing or
    unexpected keys, with our logits up to bf16 rounding (the experts adapted too: test_expert_lora_equals_peft)."""
    peft_loads_our_adapter(checkpoints, tmp_path, arch)


# ---------------------------------------------------------------------------------------------------------------------
# Merging an adapter of the experts (merge.py)


@pytest.fixture(scope="module")
def experts_adapter(checkpoints, tmp_path_factory):
    """arch -> our LoRA on the linears and the experts (r=4, random B) of its sharded checkpoint, saved as train.py
    saves it (trained on the nf4 base)."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_adapter(checkpoints(arch), tmp_path_factory.mktemp(f"{arch}-experts-adapter"),
                                      targets=EXPERT_TARGETS)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_merged_experts_equal_peft_merge_and_unload(checkpoints, experts_adapter, tmp_path, arch):
    """merge.py --semantics bf16 writes the experts one per expert, as the base holds them, and from_pretrained's
    model of the folder is PEFT's merge_and_unload: every experts tensor W_e + B_e A_e alpha/r up to one bf16
    rounding of the update (PEFT rounds it to bf16 before adding it; merge.py adds in fp32 and rounds once, as for
    the linears), the rest bit for bit; its logits are our unmerged model's."""
    from peft import PeftModel

    base, adapter, out = checkpoints(arch), experts_adapter(arch), tmp_path / "merged"
    merge.merge(str(base), adapter, out, semantics="bf16", verify=False, progress=False)
    assert model_loading.index_checkpoint(out).keys() == model_loading.index_checkpoint(base).keys()
    merged = reference_model(out)
    peft = PeftModel.from_pretrained(reference_model(base), adapter).merge_and_unload()
    original, ours, theirs = reference_model(base).state_dict(), merged.state_dict(), peft.state_dict()
    assert ours.keys() == theirs.keys() and sum(".experts." in name for name in ours) == 4
    for name, w in ours.items():
        if ".experts." not in name:
            assert torch.equal(w, theirs[name]), name
            continue
        update = (theirs[name].float() - original[name].float()).abs().max().item()
        assert update > 0.01  # the experts' update is in both
        torch.testing.assert_close(w, theirs[name], rtol=2**-7, atol=update * 2**-8)
    unmerged = load_model(base, quant="none", device=DEVICE, progress=False).eval()
    lora.apply_adapter(unmerged, adapter)
    with torch.no_grad():
        expected, got, plain = (m(TOKENS).logits for m in (unmerged, merged, reference_model(base)))
    assert (expected - plain).abs().max() > 0.05
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_merged_experts_are_the_model_as_trained(checkpoints, experts_adapter, tmp_path, arch):
    """With the default semantics the experts' W is the NF4 base they were trained against: from_pretrained of the
    merged folder gives the logits of our NF4 base + adapter (bf16 tolerance), and merge.py's own check, which
    compares the two, reports a difference within it."""
    base, adapter, out = checkpoints(arch), experts_adapter(arch), tmp_path / "merged"
    reported = merge.merge(str(base), adapter, out, progress=False)
    trained = load_model(base, quant="nf4", device=DEVICE, progress=False).eval()
    lora.apply_adapter(trained, adapter)
    with torch.no_grad():
        expected, got, plain = (m(TOKENS).logits for m in (trained, reference_model(out), reference_model(base)))
    # bf16 activations round the update's two forms (applied to the routed tokens; merged into W) differently, and
    # more so in the GPU's kernels; the adapter moves the logits by ~0.5, well above either tolerance
    tol = 2e-2 if DEVICE.type == "cpu" else 4e-2
    assert (expected - plain).abs().max() > 5 * tol
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert reported < tol


def test_experts_merge_into_the_layout_of_the_base(checkpoints, fused_checkpoint, experts_adapter, tmp_path):
    """A base whose experts are stored fused (one tensor per layer, as a state_dict holds them) is merged into the
    same fused layout, and its merged tensors are, exactly, those of the merge into the same weights stored one per
    expert, once from_pretrained has fused them."""
    adapter = experts_adapter("mixtral")
    for layout, base in (("fused", fused_checkpoint), ("per-expert", checkpoints("mixtral"))):
        merge.merge(str(base), adapter, tmp_path / layout, verify=False, progress=False)
    written = model_loading.index_checkpoint(tmp_path / "fused")
    assert written.keys() == model_loading.index_checkpoint(fused_checkpoint).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in written
    fused, per_expert = (reference_model(tmp_path / layout).state_dict() for layout in ("fused", "per-expert"))
    assert fused.keys() == per_expert.keys() and all(torch.equal(fused[k], per_expert[k]) for k in fused)


def test_experts_adapter_that_does_not_fit_is_refused(checkpoints, experts_adapter, tmp_path):
    """An experts adapter merged into a base without experts, one missing a factor, and one whose factors are for
    another number of experts are refused naming the tensor, from the headers, before anything is written."""
    import shutil

    adapter, out = experts_adapter("qwen3_moe"), tmp_path / "out"
    with pytest.raises(merge.MergeError, match=r"adapts \['experts.down_proj', 'experts.gate_up_proj'\] "
                                               r"\(target_parameters\), which this base model does not have"):
        merge.merge(str(checkpoints("llama")), adapter, out, progress=False)
    damaged = tmp_path / "damaged"
    shutil.copytree(adapter, damaged)
    tensors = load_file(damaged / "adapter_model.safetensors")
    experts = "base_model.model.model.layers.1.mlp.experts"
    b = tensors.pop(f"{experts}.lora_B.weight")  # down_proj's
    save_file(tensors, damaged / "adapter_model.safetensors")
    with pytest.raises(merge.MergeError, match=rf"holds no {experts}.lora_B.weight: the file is incomplete"):
        merge.merge(str(checkpoints("qwen3_moe")), damaged, out, progress=False)
    tensors[f"{experts}.lora_B.weight"] = torch.cat([b, b], dim=1)  # (out, r x 8 experts)
    save_file(tensors, damaged / "adapter_model.safetensors")
    with pytest.raises(merge.MergeError, match=r"does not fit model\.layers\.1\.mlp\.experts\.down_proj of shape "
                                               r"\[4, 64, 64\]: it has lora_A \[16, 64\] and lora_B \[64, 32\]"):
        merge.merge(str(checkpoints("qwen3_moe")), damaged, out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# benchmark.py on mixtures of experts (its timed runs need a GPU; these are the parts that decide what it compares)


def test_benchmark_moe_shapes_are_the_real_models():
    """The MoE shapes build transformers' models of the published sizes (counted on meta): Qwen3-30B-A3B 30.5B
    parameters, 3.3B active per token, and Mixtral-8x7B 46.7B and 12.9B; the 6N of the MFU counts the active ones
    (linear_params, with the input embedding beside it)."""
    for shape, total, active in (("qwen3-30b-a3b", 30.5, 3.3), ("mixtral-8x7b", 46.7, 12.9)):
        config = benchmark.shape_config(shape)
        skeleton = model_loading.build_skeleton(config, "none")
        embedding = skeleton.get_input_embeddings().weight.numel()
        assert round(sum(p.numel() for p in skeleton.parameters()) / 1e9, 1) == total, shape
        assert round((benchmark.linear_params(config) + embedding) / 1e9, 1) == active, shape
        assert benchmark.lora_targets(config) == "all-linear,experts"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_benchmark_reference_adapts_what_ours_adapts(checkpoints, arch):
    """The reference's LoraConfig targets (the linears by name, the experts' tensors as target_parameters) make PEFT
    adapt exactly what ours adapts with --lora_targets all-linear,experts, all at rank r: not Qwen2-MoE's
    shared_expert_gate, which PEFT's own "all-linear" takes, nor the router weights and the rank-2r gate_up_proj
    that it takes on Mixtral and Qwen3-MoE."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    path = checkpoints(arch, "single")
    config = model_loading.read_config(path)
    targets = benchmark.reference_lora_targets(config)
    assert targets["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    peft_model = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=8, **targets))
    linears, params = peft_adapted(peft_model)
    assert linears | params == lora.targets_on(config, benchmark.lora_targets(config)).keys() and len(params) == 4
    adapters = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert all(m.r["default"] == 4 and m.scaling["default"] == 2 for m in adapters)


def test_benchmark_writes_a_prequantized_moe_with_4bit_experts(monkeypatch, tmp_path):
    """--prequantized on an MoE shape (1 layer) writes 4-bit linears and 4-bit fused experts (quantize_experts),
    into a folder of its own name; our loader uses the stored bytes as they are (nothing quantized), and the model
    is its dequantization (the logits of --quant none, exactly), of weights drawn at the initializer's scale."""
    tiny = dict(model_type="mixtral", **SHAPE, num_local_experts=4, num_experts_per_tok=2)
    monkeypatch.setitem(benchmark.SHAPES, "tiny-mixtral", tiny)
    out = benchmark.synthetic_checkpoint("tiny-mixtral", 1, tmp_path, prequantized=True)
    assert out.name.endswith("-nf4-experts")
    stored = model_loading.index_checkpoint(out)
    assert "model.layers.0.mlp.experts.gate_up_proj.absmax" in stored and not any(".experts.0." in n for n in stored)
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in stored
    assert "model.layers.1.input_layernorm.weight" not in stored  # --layers 1
    with monkeypatch.context() as m:
        m.setattr(quantization, "quantize", lambda *a, **k: pytest.fail("quantized a pre-quantized weight"))
        ours = load_model(out, quantization.AUTO, DEVICE, progress=False).eval()
    shells = quantization.packed_shells(ours)
    assert len(shells) == 2
    for shell in shells.values():
        std = shell().float().std().item()
        assert abs(std - benchmark.shape_config("tiny-mixtral").initializer_range) < 0.1 * std
    dense = load_model(out, "none", DEVICE, progress=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, dense(TOKENS).logits, **DENSE_AS_4BIT)


def test_benchmark_refuses_a_prequantized_moe_for_the_reference(monkeypatch):
    """transformers cannot load experts in 4 bits: --prequantized on an MoE shape without --no_reference is refused
    before a checkpoint is written."""
    monkeypatch.setattr(benchmark, "synthetic_checkpoint", lambda *a, **k: pytest.fail("wrote a checkpoint"))
    monkeypatch.setattr("sys.argv", ["benchmark.py", "--shape", "qwen3-30b-a3b", "--prequantized"])
    with pytest.raises(SystemExit, match=r"--prequantized on the mixture of experts qwen3-30b-a3b .* add "
                                         r"--no_reference"):
        benchmark.main()
