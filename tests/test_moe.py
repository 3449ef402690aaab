"""Mixture-of-experts models: transformers keeps each layer's experts fused in 3-D parameters, save_pretrained writes
them one per expert; the loader reads either layout and builds transformers' own model."""
import pytest
import torch
from conftest import (DEVICE, MOE, TOKENS, common, losses, reference_model, run_inprocess, run_torchrun,
                      tiny_config)
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import model_loading
import quantization
import quantize
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
        torch.testing.assert_close(ours(TOKENS).logits, ref(TOKENS).logits, rtol=1e-2, atol=1e-2)
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
    """The packed experts shard with the rest of their decoder layer: 2 ranks of batch 4 (torchrun) give the losses
    of 1 process of batch 8, Mixtral in nf4."""
    path = checkpoints("mixtral")
    two = run_torchrun(common(path, tmp_path / "two", steps=2) + ["--batch_size", "4"], nproc=2)
    one = run_inprocess(common(path, tmp_path / "one", steps=2) + ["--batch_size", "8"])
    torch.testing.assert_close(losses(two), losses(one), rtol=5e-3, atol=0)


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
