"""Mixture-of-experts models: transformers keeps each layer's experts fused in 3-D parameters, save_pretrained writes
them one per expert; the loader reads either layout and builds transformers' own model."""
import json

import pytest
import torch
from conftest import (DEVICE, MOE, TOKENS, adapted, common, losses, randomize_b, reference_model, run_inprocess,
                      run_torchrun, tiny_config)
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

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
# LoRA on the experts (--lora_targets all-linear,experts), in PEFT's target_parameters format

EXPERT_TARGETS = (lora.ALL_LINEAR, lora.EXPERTS)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_expert_lora_equals_peft(checkpoints, tmp_path, arch):
    """Our LoRA on the linears and the experts (random B, --quant none), saved, is what PEFT 0.21 loads onto
    transformers' own model: the same keys, none missing or unexpected, and the same logits (bf16 tolerance)."""
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
    inter = 128 if arch == "mixtral" else 64
    assert saved[f"{experts}.base_layer.lora_A.weight"].shape == (4 * 4, 64)  # gate_up_proj: (r * experts, hidden)
    assert saved[f"{experts}.base_layer.lora_B.weight"].shape == (2 * inter, 4 * 4)
    assert saved[f"{experts}.lora_A.weight"].shape == (4 * 4, inter)  # down_proj
    peft = PeftModel.from_pretrained(reference_model(path), tmp_path).eval()
    theirs = get_peft_model_state_dict(peft)
    assert theirs.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(theirs[key].float(), value, rtol=0, atol=0 if theirs[key].dtype == torch.float32
                                   else value.abs().max().item() / 128)
    with torch.no_grad():
        want, base = peft(TOKENS).logits.float(), reference_model(path)(TOKENS).logits.float()
        got = ours(TOKENS).logits.float()
        for module in lora.lora_modules(ours).values():
            if isinstance(module, lora.ExpertsLoRA):
                module.scaling = 0.0
        without_experts = ours(TOKENS).logits.float()
    assert (want - base).abs().max() > 0.1 and (without_experts - got).abs().max() > 0.1  # the experts' LoRA counts
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_expert_lora_round_trips_exactly(checkpoints, tmp_path):
    """save_adapter -> load_adapter into a freshly injected model (another seed) gives back every factor exactly;
    generate.py applies the adapter (lora.apply_adapter) to the same logits; merge.py refuses it, as not done yet."""
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
    with pytest.raises(merge.MergeError, match="merging them is not done yet"):  # refused before anything is read
        merge.merge(str(path), tmp_path, tmp_path / "merged", progress=False)
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

