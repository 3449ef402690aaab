"""Mixture-of-experts models: transformers keeps each layer's experts fused in 3-D parameters, save_pretrained writes
them one per expert; the loader reads either layout and builds transformers' own model, its experts in 4 bits. LoRA on
the experts, and merging it, is tests/test_moe_lora.py."""
import pytest
import torch
from conftest import (CHECKED_MOE, DEVICE, MOE, SHAPE, TOKENS, common, editable_copy, experts_modules, losses,
                      reference_model, run_inprocess, run_torchrun)
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
import moe_lora
import out_folder
import peft_format
import quantization
import quantize
import shard_reader
import train
from model_loading import ModelFolderError, load_model, quantized_weights



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
    names = model_loading.index_weights(path)
    assert not any("gate_up_proj" in n for n in names)
    assert any(".experts.3." in n for n in names) or "model.layers.0.block_sparse_moe.input_linear.weight" in names
    assert_logits_equal_from_pretrained(path)


def test_fused_experts_load_too(fused_checkpoint):
    """Experts stored fused, as the model holds them, load into the same model."""
    assert "model.layers.0.mlp.experts.gate_up_proj" in model_loading.index_weights(fused_checkpoint)
    assert_logits_equal_from_pretrained(fused_checkpoint)


def test_experts_are_fused_one_layer_at_a_time(checkpoints, monkeypatch):
    """Fusing holds no more than one layer's experts: its gate_up_proj and down_proj are made as soon as their last
    expert has been read, before the next layer's experts arrive."""
    path, events = checkpoints("qwen3_moe"), []
    read = shard_reader.read_ahead

    def recording(*args, **kwargs):
        for name, tensor in read(*args, **kwargs):
            events.append(("read", name))
            yield name, tensor

    put = model_loading._put
    monkeypatch.setattr(shard_reader, "read_ahead", recording)
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
    monkeypatch.setattr(shard_reader, "read_ahead", lambda *a, **k: pytest.fail("read tensor data"))
    with pytest.raises(ModelFolderError, match=rf"{dropped} is missing from the checkpoint.*layers\.1\.mlp\.experts"
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
    stored = model_loading.index_weights(out)
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
    out_folder.copy_beside(src, tmp_path)
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
    stored = model_loading.index_weights(out)
    assert not any(".experts.0." in n or "block_sparse_moe" in n for n in stored)
    for stat in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"):
        assert f"model.layers.1.mlp.experts.gate_up_proj{stat}" in stored
    quantize.main(["--model", str(src), "--out", str(tmp_path / "bf16-experts")])
    without = model_loading.index_weights(tmp_path / "bf16-experts")
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
    on either base. quantize.py's folder records the original as its base: neither needs --allow_other_base."""
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
    (on_packed, _), (on_original, _) = (generate.load(str(m), str(tmp_path / "run"), None, DEVICE, False)
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
    with pytest.raises(ModelFolderError, match=message):
        load_model(path, progress=False)


def test_quantize_experts_on_a_dense_model_is_refused(checkpoints, tmp_path):
    """--quantize_experts on a model without MoE experts is refused, as train.py refuses --lora_targets experts on
    one, where it wrote the plain 4-bit checkpoint and said '0 of them experts tensors'; no folder is written."""
    path = checkpoints("llama", "single")
    assert not quantization.packed_shells(model_loading.build_skeleton(model_loading.read_config(path), "nf4"))
    with pytest.raises(quantize.QuantizeError, match=r"--quantize_experts: .* has no MoE experts.*drop the flag"):
        quantize.quantize_checkpoint(str(path), tmp_path / "q", progress=False, quantize_experts=True)
    assert not (tmp_path / "q").exists()


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
# The four checks of every supported architecture (README, Architectures), on the mixtures of experts. The first,
# --quant none logits equal from_pretrained's, is test_moe_unquantized_logits_equal_from_pretrained above.


@pytest.mark.parametrize("arch", CHECKED_MOE)
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
        path = name.removeprefix(peft_format.PEFT_PREFIX).replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            params.add(f"{path}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            linears.add(path)
    return linears, params


@pytest.mark.parametrize("arch", CHECKED_MOE)
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
    experts = moe_lora.expert_tensors(skeleton, layer_cls)
    assert len(experts) == 4 and experts.keys() == quantization.packed_shells(skeleton).keys()
    bare_routers = {f"{name.rpartition('.experts.')[0]}.gate.weight" for name in experts}
    assert params == (set() if arch == "qwen2_moe" else experts.keys() | bare_routers)
    doubled = [m for m in peft_model.modules() if isinstance(m, ParamWrapper) and m.parameter_name == "gate_up_proj"]
    assert all(m.r["default"] == 8 for m in doubled) and len(doubled) == len(params) // 3


@pytest.mark.parametrize("arch", CHECKED_MOE)
def test_moe_peft_loads_our_adapter_with_same_logits(checkpoints, tmp_path, arch):
    """The dense architectures' check (test_lora) on the default targets: PEFT loads our adapter with no missing or
    unexpected keys, with our logits up to bf16 rounding (the experts adapted too: test_expert_lora_equals_peft)."""
    peft_loads_our_adapter(checkpoints, tmp_path, arch)


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
    assert linears | params == moe_lora.targets_on(config, benchmark.lora_targets(config)).keys() and len(params) == 4
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
    stored = model_loading.index_weights(out)
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
