"""LoRA on mixtures of experts' experts tensors (--lora_targets all-linear,experts, or experts alone), in PEFT's
target_parameters format: against PEFT, against the merged weights' forward, in training and resuming, and merged into
a checkpoint by merge.py. The loading of MoE checkpoints is tests/test_moe.py."""
import json

import pytest
import torch
from conftest import (CHECKED_MOE, DEVICE, MOE, SHAPE, TOKENS, adapted, common, experts_modules, inject,
                      losses, make_adapter, randomize_b, reference_model, refused_before_loading,
                      run_inprocess)
from safetensors.torch import load_file, save_file

import fused
import generate
import lora
import merge
import model_loading
import moe_lora
import peft_format
import quantization
import train
from model_loading import load_model


# ---------------------------------------------------------------------------------------------------------------------
# LoRA on the experts (--lora_targets all-linear,experts), in PEFT's target_parameters format

EXPERT_TARGETS = (lora.ALL_LINEAR, lora.EXPERTS)


@pytest.mark.parametrize("arch", CHECKED_MOE)
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
            if isinstance(module, moe_lora.ExpertsLoRA):
                module.lora_B.weight.mul_(5)
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(ours)), tmp_path, r=4, alpha=8.0, dropout=0.0,
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
            if isinstance(module, moe_lora.ExpertsLoRA):
                module.scaling = 0.0
        without_experts = ours(TOKENS).logits.float()
    assert (want - base).abs().max() > 0.1 and (without_experts - got).abs().max() > 0.1  # the experts' LoRA counts
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,r", [(torch.float32, 4), (torch.bfloat16, 8), (torch.bfloat16, 4)])
@pytest.mark.parametrize("arch", MOE)
def test_expert_lora_on_the_tokens_is_the_merged_weights_forward(checkpoints, monkeypatch, arch, dtype, r):
    """LoRA applied to each expert's routed tokens (moe_lora._grouped_forward: the grouped kernel at r=8 in bf16, expert
    by expert otherwise) computes what the class's own forward computes with W_e + s B_e A_e as its weights: the same
    output and the same gradients for the input, A and B (fp32: to rounding; bf16: to bf16 tolerance)."""
    model, _ = adapted(checkpoints(arch, "single"), r=r, targets=(lora.EXPERTS,))
    experts = experts_modules(model.to(dtype))[0]
    assert moe_lora.groups_by_expert(experts)
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
    monkeypatch.setattr(moe_lora, "groups_by_expert", lambda experts: False)  # an experts class transformers does not
    fallback = run(lambda x: experts(x, top_k_index, top_k_weights))  # describe: the merged weights, in its forward
    for ours, theirs in zip(fallback, want):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert want[0].abs().max() > 0 and all(w.abs().max() > 0 for w in want)
    for ours, theirs in zip(got, want):
        torch.testing.assert_close(ours.float() / theirs.abs().max(), theirs.float() / theirs.abs().max(), **tol)


@pytest.mark.parametrize("arch", MOE)
def test_compiled_experts_compute_the_same(checkpoints, monkeypatch, arch):
    """fused.compile_elementwise compiles the experts' routed computation (moe_lora.routed_experts) of every layer as
    one graph: the output and the gradients of the input, A and B stay those of the eager forward (on CPU through
    aot_eager, exactly; on a GPU, inductor's fused kernels round once instead of per op). bf16 at r=8, where the
    grouped kernel runs; compiled from 48 routed rows on here, as from COMPILED_FROM_ROWS in training."""
    monkeypatch.setattr(fused, "COMPILED_FROM_ROWS", 48)
    on_gpu = DEVICE.type == "cuda"
    backend, tol = ("inductor", dict(rtol=2e-2, atol=2e-2)) if on_gpu else ("aot_eager", dict(rtol=0, atol=0))
    model, _ = adapted(checkpoints(arch, "single"), r=8, targets=(lora.EXPERTS,))
    model.to(torch.bfloat16)
    randomize_b(model)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, SHAPE["hidden_size"], generator=g).to(DEVICE, torch.bfloat16)
    top_k_index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(24)]).to(DEVICE)
    top_k_weights = torch.rand(24, 2, generator=g).to(DEVICE, torch.bfloat16)

    def run():
        outs = []
        for experts in experts_modules(model):
            factors = [p for adapter in experts.lora_experts.values() for p in adapter.parameters()]
            x = hidden.clone().requires_grad_()
            out = experts(x, top_k_index, top_k_weights)
            out.float().square().sum().backward()
            outs += [out, x.grad] + [p.grad.clone() for p in factors]
            for p in factors:
                p.grad = None
        return outs

    eager = run()
    torch._dynamo.reset()
    fused.compile_elementwise(model, model_loading.decoder_layer_class(model), backend)
    assert all(hasattr(experts, "routed") for experts in experts_modules(model))
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # the second layer reuses the first one's graph
        compiled = run()
    assert counters["stats"]["unique_graphs"] == 1  # it ran compiled
    assert all(t.abs().max() > 0 for t in eager)
    for ours, theirs in zip(compiled, eager):
        torch.testing.assert_close(ours.float() / theirs.abs().max(), theirs.float() / theirs.abs().max(), **tol)


def test_expert_lora_round_trips_exactly(checkpoints, tmp_path):
    """save_adapter -> load_adapter into a freshly injected model (another seed) gives back every factor exactly;
    generate.py applies the adapter (peft_format.apply_adapter) to the same logits."""
    path = checkpoints("qwen3_moe", "single")
    first, _ = adapted(path, targets=EXPERT_TARGETS)
    randomize_b(first)
    state = lora.adapter_weights(lora.lora_modules(first))
    peft_format.save_adapter(state, tmp_path, r=4, alpha=8.0, dropout=0.0, base_model=str(path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    torch.manual_seed(123)
    second, _ = adapted(path, targets=EXPERT_TARGETS)
    peft_format.load_adapter(second, tmp_path)
    loaded = lora.adapter_weights(lora.lora_modules(second))
    assert loaded.keys() == state.keys() and any(".lora_experts." in k for k in state)
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    # peft_format.apply_adapter: r, alpha, targets
    as_generated, _ = generate.load(str(path), str(tmp_path), "none", DEVICE)
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
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(ours)), tmp_path, r=4, alpha=8.0, dropout=0.0,
                             base_model=str(path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] is None
    peft = PeftModel.from_pretrained(reference_model(path), tmp_path).eval()
    assert get_peft_model_state_dict(peft).keys() == load_file(tmp_path / "adapter_model.safetensors").keys()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, peft(TOKENS).logits, rtol=2e-2, atol=2e-2)


def test_target_parameters_named_bare_apply_as_in_peft(checkpoints, tmp_path):
    """target_parameters may name a tensor alone ("down_proj", as PEFT writes them for all-linear on a mixture of
    experts): generate.py applies such an adapter to PEFT's logits, as it does the "experts.down_proj" form."""
    from peft import PeftModel

    path = checkpoints("qwen3_moe", "single")
    ours, _ = adapted(path, targets=EXPERT_TARGETS)
    randomize_b(ours)
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(ours)), tmp_path, r=4, alpha=8.0, dropout=0.0,
                             base_model=str(path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_parameters"] = [t.rpartition(".")[2] for t in config["target_parameters"]]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    peft = PeftModel.from_pretrained(reference_model(path), tmp_path).eval()
    as_generated, _ = generate.load(str(path), str(tmp_path), "none", DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(as_generated(TOKENS).logits, peft(TOKENS).logits, rtol=2e-2, atol=2e-2)


def test_an_adapter_of_some_of_the_experts_tensors_is_refused_naming_them(checkpoints, tmp_path):
    """A PEFT adapter of the experts' gate_up_proj alone: generate.py (which adapts all of the experts' tensors, as
    train.py does) refuses it naming the tensors and PEFT, not as made for another base."""
    from peft import LoraConfig, get_peft_model

    path = checkpoints("qwen3_moe", "single")
    peft = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                            target_parameters=["experts.gate_up_proj"]))
    peft.save_pretrained(tmp_path)
    with pytest.raises(lora.AdapterError, match=r"adapts the MoE experts' \['gate_up_proj'\] only \(target_parameters"
                                                r"\), not \['down_proj'\], which this loader does not do: use it "
                                                "with PEFT itself"):
        generate.load(str(path), str(tmp_path), "none", DEVICE)


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
    with its flags, and inject_experts_lora too."""
    path = checkpoints("mixtral", "single")
    with pytest.raises(ValueError, match="lora_dropout 0"):
        train.parse_config(["--model", str(path), "--lora_targets", "all-linear,experts", "--lora_dropout", "0.1"])
    model = load_model(path, quant="none", device=DEVICE, progress=False)
    with pytest.raises(ValueError, match="lora_dropout 0"):
        inject(model, list(EXPERT_TARGETS), dropout=0.1)


@pytest.mark.parametrize("arch, targets", [("llama", "all-linear,experts"), ("llama", "experts"),
                                           ("mixtral", "q_porj")])
def test_targets_that_select_nothing_are_refused_before_tokenizing(checkpoints, tmp_path, monkeypatch, arch, targets):
    """'experts' on a dense model, or a linear no decoder layer has, is refused before the data is tokenized and the
    model loaded (minutes for a large one), with the refusal the injection into the loaded model gives."""
    path = checkpoints(arch)
    with pytest.raises(ValueError) as injected:
        inject(load_model(path, quant="none", device=DEVICE, progress=False), targets.split(","))
    with pytest.raises(ValueError) as refused:
        refused_before_loading(monkeypatch, tmp_path, path, tokenizes=False, args=("--lora_targets", targets))
    assert str(refused.value) == str(injected.value)


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
    inject(model, list(EXPERT_TARGETS))
    fsdp_wrap.group_adapters(model, layer_cls)
    units = [m for m in model.modules() if isinstance(m, fsdp_wrap.LayerAdapters)]
    assert len(units) == 2
    for unit in units:
        keys = set(unit.adapters)
        assert {f"mlp-experts-lora_experts-{t}-lora_{ab}" for t in ("gate_up_proj", "down_proj") for ab in "AB"} <= keys
        assert all(p.requires_grad and p.dtype == torch.float32 for p in unit.adapters.parameters())
        assert not any(p.requires_grad for p in unit._adapters_wrapped_module.parameters())



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
    assert model_loading.index_weights(out).keys() == model_loading.index_weights(base).keys()
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
    peft_format.apply_adapter(unmerged, adapter)
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
    peft_format.apply_adapter(trained, adapter)
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
    adapter = experts_adapter("mixtral")  # made on the per-expert folder: the fused one is other files
    for layout, base in (("fused", fused_checkpoint), ("per-expert", checkpoints("mixtral"))):
        merge.merge(str(base), adapter, tmp_path / layout, verify=False, progress=False,
                    allow_other_base=layout == "fused")
    written = model_loading.index_weights(tmp_path / "fused")
    assert written.keys() == model_loading.index_weights(fused_checkpoint).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in written
    fused, per_expert = (reference_model(tmp_path / layout).state_dict() for layout in ("fused", "per-expert"))
    assert fused.keys() == per_expert.keys() and all(torch.equal(fused[k], per_expert[k]) for k in fused)


def test_experts_adapter_that_does_not_fit_is_refused(checkpoints, experts_adapter, tmp_path):
    """An experts adapter merged into a base without experts (let through by --allow_other_base), one missing a
    factor, and one whose factors are for another number of experts are refused naming the tensor, from the
    headers, before anything is written."""
    import shutil

    adapter, out = experts_adapter("qwen3_moe"), tmp_path / "out"
    with pytest.raises(merge.MergeError, match=r"adapts \['experts.down_proj', 'experts.gate_up_proj'\] "
                                               r"\(target_parameters\), which this base model does not have"):
        merge.merge(str(checkpoints("llama")), adapter, out, progress=False, allow_other_base=True)
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
