"""Our LoRA module and its PEFT-format adapters against PEFT itself."""
import json

import pytest
import torch
from conftest import DEVICE, LLAMA_LINEARS, SHAPE, SUPPORTED, TOKENS, adapted, randomize_b, reference_model, tiny_config

import lora
import moe_lora
import peft_format
import quantization
import train
from model_loading import build_skeleton, decoder_layer_class, load_model, read_config


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_lora_at_init_equals_base(checkpoints, quant):
    """B = 0 at init, so the adapted model's logits are the base model's, exactly."""
    path = checkpoints("qwen2")
    base = load_model(path, quant=quant, device=DEVICE, progress=False).eval()
    model, names = adapted(path, quant)
    assert len(names) == 14
    assert all(m.lora_A.weight.abs().sum() > 0 and m.lora_A.weight.dtype == torch.float32
               for m in lora.lora_modules(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, base(TOKENS).logits, rtol=0, atol=0)


def test_targets_select_modules_and_never_lm_head(checkpoints):
    """Targets select decoder-layer linears by name or regex; lm_head is none of them, so it is warned about as a
    target that matches nothing, and it is not listed among the linears that exist."""
    with pytest.warns(UserWarning, match=r"'lm_head' matches nothing in 2 of 2 decoder layers .*'down_proj'"):
        model, names = adapted(checkpoints("llama"), targets=["q_proj", r".*mlp\.down_proj", "lm_head"])
    assert sorted(n.split(".", 3)[-1] for n in names) == ["mlp.down_proj", "mlp.down_proj", "self_attn.q_proj",
                                                          "self_attn.q_proj"]
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="match no linear layer") as refused:
        adapted(checkpoints("llama"), targets=["query_key_value"])
    assert "'q_proj'" in str(refused.value) and "lm_head" not in str(refused.value)


def test_targets_that_a_model_fuses_are_warned_about(checkpoints):
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: Llama's linears by name then adapt only o_proj
    and down_proj, and each missing target is warned about, naming the linears the layers do have."""
    with pytest.warns(UserWarning, match=r"'q_proj' matches nothing in 2 of 2 decoder layers .*'qkv_proj'"):
        _, names = adapted(checkpoints("phi3"), targets=LLAMA_LINEARS.split(","))
    assert lora.kinds(names) == ["down_proj", "o_proj"]


@pytest.mark.parametrize("arch", SUPPORTED)
def test_default_targets_are_every_linear_of_the_decoder_layers(checkpoints, arch):
    """The default targets adapt every linear of every decoder layer (Phi-3's fused qkv_proj and gate_up_proj too):
    the layers PEFT's own "all-linear" adapts in transformers' model, and each layer our loader makes 4-bit."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    path = checkpoints(arch)
    skeleton = build_skeleton(read_config(path), "nf4")  # on meta, with the 4-bit shells the loader fills
    ours = lora.matching_modules(skeleton, train.Config.lora_targets, decoder_layer_class(skeleton))
    peft_model = get_peft_model(reference_model(path), LoraConfig(r=4, target_modules="all-linear"))
    theirs = {n.removeprefix(peft_format.PEFT_PREFIX) for n, m in peft_model.named_modules()
              if isinstance(m, LoraLayer)}
    assert sorted(ours) == sorted(theirs)
    assert set(ours) == {n for n, m in skeleton.named_modules() if quantization.is_4bit(m)}
    assert len(ours) == 2 * (4 if arch == "phi3" else 7)


def test_all_linear_of_llama_is_the_former_default():
    """On Llama, "all-linear" adapts exactly the layers the former default named: runs train what they trained."""
    config = tiny_config("llama")
    assert moe_lora.targets_on(config, lora.ALL_LINEAR).keys() == moe_lora.targets_on(config, LLAMA_LINEARS).keys()


def test_moe_routers_are_not_among_all_linear():
    """In a mixture-of-experts block, the linears beside the experts route tokens and stay frozen: PhiMoE's router
    (an nn.Linear to the number of experts) and Qwen2-MoE's shared_expert_gate (to 1). The shared expert's own
    linears are adapted; naming a router still adapts it. (Experts are 3-D parameters, not linears.)"""
    import transformers

    attention = ["k_proj", "o_proj", "q_proj", "v_proj"]
    phimoe = transformers.PhimoeConfig(**SHAPE, num_local_experts=4)
    assert lora.kinds(moe_lora.targets_on(phimoe, lora.ALL_LINEAR)) == attention
    qwen2_moe = transformers.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=64, **SHAPE)
    selected = moe_lora.targets_on(qwen2_moe, lora.ALL_LINEAR)
    assert lora.kinds(selected) == sorted(attention + ["down_proj", "gate_proj", "up_proj"])
    assert all(".shared_expert." in n for n in selected if n.endswith("_proj") and ".mlp." in n)
    assert lora.kinds(moe_lora.targets_on(qwen2_moe, "shared_expert_gate")) == ["shared_expert_gate"]


def test_invalid_target_regex_names_the_pattern():
    """A target that is no regex is a ValueError naming it, also for callers of matching_modules itself."""
    with pytest.raises(ValueError, match=r"--lora_targets: '\(q_proj' is not a valid regular expression"):
        lora.matching_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["k_proj", "(q_proj"], torch.nn.Linear)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_peft_loads_our_adapter_with_same_logits(checkpoints, tmp_path, arch):
    """PEFT loads the saved adapter (default targets) with no missing or unexpected LoRA keys and computes the same
    logits; its config names the layers adapted, not "all-linear", for PEFT and vLLM to match by name."""
    from peft import PeftModel, get_peft_model_state_dict

    path = checkpoints(arch)
    model, names = adapted(path)
    randomize_b(model)
    state = lora.adapter_weights(lora.lora_modules(model))
    peft_format.save_adapter(state, tmp_path, r=4, alpha=8.0, dropout=0.0, base_model=str(path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == lora.kinds(names)

    peft_model = PeftModel.from_pretrained(reference_model(path), tmp_path).eval()
    peft_state = get_peft_model_state_dict(peft_model)
    assert set(peft_state) == {peft_format.PEFT_PREFIX + k for k in state}
    for key, value in state.items():
        torch.testing.assert_close(peft_state[peft_format.PEFT_PREFIX + key], value, rtol=0, atol=0)
    with torch.no_grad():
        ours, theirs = model(TOKENS).logits, peft_model(TOKENS).logits
        base = reference_model(path)(TOKENS).logits
    # The keys above fix which layers are adapted; the logits, that PEFT applies them as we do. PEFT computes the
    # update in fp32, we in bf16: they differ by bf16 rounding, which grows with the activations (Gemma 2's and
    # Granite's tiny models have larger weights, for their logit transforms to matter), here up to 7% of the
    # adapter's effect; an alpha off by a quarter made it 24% to 34%.
    effect = (ours - base).abs().max()
    assert effect > 0.05 and (ours - theirs).abs().max() < 0.1 * effect


def test_our_loader_reads_our_adapter_back(checkpoints, tmp_path):
    path = checkpoints("llama")
    model, _ = adapted(path)
    randomize_b(model)
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(model)), tmp_path, r=4, alpha=8.0, dropout=0.0,
                             base_model=str(path))
    torch.manual_seed(123)  # a different A init, and B zero
    fresh, _ = adapted(path)
    peft_format.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS).logits, model(TOKENS).logits, rtol=0, atol=0)
    wrong_rank, _ = adapted(path, r=8)
    with pytest.raises(ValueError, match="shape"):
        peft_format.load_adapter(wrong_rank, tmp_path)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_update_merged_into_the_weight_computes_the_unmerged_sum(checkpoints, quant):
    """The update added to the weight gives the output, and the gradients of x, A and B, of the update added to the
    base output (up to bf16 rounding). Qwen2's q_proj has a bias; down_proj is wider in than out."""
    model, _ = adapted(checkpoints("qwen2"), quant)
    randomize_b(model)
    model.train()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        module = model.get_submodule(name)
        x = torch.randn(3 * module.base.in_features, module.base.in_features, dtype=torch.bfloat16, device=DEVICE)
        assert module.merges(x[:8])  # training: merged whatever the number of rows
        with torch.no_grad():  # inference: merged only for more rows than input features
            assert module.merges(x) and not module.merges(x[:module.base.in_features])
        probe = torch.randn(x.shape[0], module.base.out_features, device=DEVICE)  # a random direction to differentiate
        results = []
        for path in (module.merged, module.unmerged):
            inputs = [x.clone().requires_grad_(), module.lora_A.weight, module.lora_B.weight]
            out = path(inputs[0])
            results.append([out, *torch.autograd.grad((out.float() * probe).sum(), inputs)])
        for merged, unmerged in zip(*results):
            assert unmerged.abs().max() > 0
            torch.testing.assert_close(merged, unmerged, rtol=2e-2, atol=2e-2 * unmerged.abs().max().item())


def test_an_adapter_peft_made_applies_without_warnings_about_flags_nobody_gave(checkpoints, tmp_path):
    """PEFT's save_pretrained lists "all-linear" as each layer's full path: apply_adapter takes them silently (the
    warning about a target that misses some decoder layer is for --lora_targets) and computes PEFT's logits."""
    import warnings

    from peft import LoraConfig, get_peft_model

    path = checkpoints("llama")
    theirs = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    theirs.save_pretrained(tmp_path)
    ours = load_model(path, quant="none", device=DEVICE, progress=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_format.apply_adapter(ours, tmp_path)
    with torch.no_grad():
        mine, peft, base = ours(TOKENS).logits, theirs.eval()(TOKENS).logits, reference_model(path)(TOKENS).logits
    effect = (peft - base).abs().max()
    assert effect > 0.05 and (mine - peft).abs().max() < 0.1 * effect


def peft_made(path, out, **config):
    """An adapter PEFT itself made with LoraConfig(r=4, lora_alpha=8, **config) on transformers' model of `path`, its
    LoRA weights moved off their init, saved by save_pretrained; and that PEFT model (eval mode)."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=8, **config))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    theirs.save_pretrained(out)
    return theirs.eval()


@pytest.mark.parametrize("field, config", [
    ("lora_bias", dict(target_modules=["q_proj"], lora_bias=True)),
    ("bias", dict(target_modules=["q_proj"], bias="lora_only")),
    ("layers_to_transform", dict(target_modules=["q_proj"], layers_to_transform=[1])),
    ("exclude_modules", dict(target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])),
    ("trainable_token_indices", dict(target_modules=["q_proj"], trainable_token_indices=[5, 7])),
    ("alora_invocation_tokens", dict(target_modules=["q_proj"], alora_invocation_tokens=[5, 17])),
    ("layer_replication", dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])),
    ("init_lora_weights", dict(target_modules=["q_proj"], init_lora_weights="pissa")),
    ("init_lora_weights", dict(target_modules=["q_proj"], init_lora_weights="olora")),
])
def test_a_peft_adapter_we_would_misapply_is_refused_naming_the_field(checkpoints, tmp_path, field, config):
    """A PEFT adapter whose config changes what it computes in a way apply_adapter and merge.py do not implement
    (biases, a subset of layers, trainable tokens, aLoRA, replicated layers, an init that rewrites the base weights)
    is refused from adapter_config.json, in one line naming the field and PEFT's merge as the way out; ignored, each
    gave other logits than PEFT's, silently (PiSSA, OLoRA, aLoRA) or with words about another base."""
    path = checkpoints("llama")
    peft_made(path, tmp_path, **config)
    with pytest.raises(lora.AdapterError, match=rf"sets {field}: .*merge_and_unload") as refused:
        peft_format.read_adapter_config(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_peft_adapter_whose_targets_are_dotted_suffixes_gives_peft_logits(checkpoints, tmp_path):
    """PEFT matches a target_modules entry as the module's name or a suffix of it after a dot ("self_attn.q_proj");
    apply_adapter adapts the same layers and computes PEFT's logits."""
    path = checkpoints("llama")
    theirs = peft_made(path, tmp_path, target_modules=["self_attn.q_proj", "mlp.down_proj"])
    ours = load_model(path, quant="none", device=DEVICE, progress=False).eval()
    peft_format.apply_adapter(ours, tmp_path)
    assert sorted(lora.lora_modules(ours)) == sorted(n.removeprefix(peft_format.PEFT_PREFIX)
                                                      for n in theirs.targeted_module_names)
    with torch.no_grad():
        mine, peft, base = ours(TOKENS).logits, theirs(TOKENS).logits, reference_model(path)(TOKENS).logits
    effect = (peft - base).abs().max()
    assert effect > 0.05 and (mine - peft).abs().max() < 0.1 * effect


def test_an_adapter_for_another_shape_of_base_is_refused_saying_what_to_do(checkpoints, tmp_path):
    """Applied to a base whose linears have other sizes (or another count of layers), an adapter is refused in one
    line that names the tensor and the base it was trained on, to apply it to instead."""
    from builtin import write_random_checkpoint
    from conftest import make_adapter
    from transformers import LlamaConfig

    path = checkpoints("llama")
    adapter = make_adapter(path, tmp_path / "adapter")
    for change in ({"intermediate_size": 192}, {"num_hidden_layers": 3}):
        other = write_random_checkpoint(LlamaConfig(**{**SHAPE, **change}), tmp_path / str(change))
        model = load_model(other, quant="none", device=DEVICE, progress=False).eval()
        with pytest.raises(lora.AdapterError, match=rf"model\.layers\.\d\.\S+_proj.*trained on another base "
                                                    rf"\('{path}'\); apply it to that one"):
            peft_format.apply_adapter(model, adapter)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_a_peft_adapter_holding_more_than_linears_factors_is_refused_naming_the_tensor(checkpoints, tmp_path, target):
    """PEFT's adapter of an embedding or of lm_head holds other tensors than a linear's lora_A / lora_B (the
    embedding's factors, the base weight it saves beside them): refused from the header in one line naming the
    tensor and PEFT as the way out, not blamed on a config of another adapter or on another base."""
    path = checkpoints("llama")
    peft_made(path, tmp_path, target_modules=["q_proj", target])
    with pytest.raises(lora.AdapterError, match=rf"holds base_model\.model\.\S*{target}\S+, which is not a linear "
                                                r"layer's LoRA factor.*merge_and_unload") as refused:
        peft_format.read_adapter_config(tmp_path)
    assert "\n" not in str(refused.value)
