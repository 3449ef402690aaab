"""Our LoRA module and its PEFT-format adapters against PEFT itself."""
import pytest
import torch
from conftest import ARCHS, DEVICE, TOKENS, adapted, randomize_b, reference_model

import lora
from model_loading import load_model


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


def test_default_targets_that_a_model_fuses_are_warned_about(checkpoints):
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the default targets then adapt only o_proj and
    down_proj, and each missing target is warned about, naming the linears the layers do have."""
    with pytest.warns(UserWarning, match=r"'q_proj' matches nothing in 2 of 2 decoder layers .*'qkv_proj'"):
        _, names = adapted(checkpoints("phi3"))
    assert sorted({n.split(".")[-1] for n in names}) == ["down_proj", "o_proj"]


def test_invalid_target_regex_names_the_pattern():
    """A target that is no regex is a ValueError naming it, also for callers of matching_modules itself."""
    with pytest.raises(ValueError, match=r"--lora_targets: '\(q_proj' is not a valid regular expression"):
        lora.matching_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["k_proj", "(q_proj"], torch.nn.Linear)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_our_adapter_with_same_logits(checkpoints, tmp_path, arch):
    """PEFT loads the saved adapter with no missing or unexpected LoRA keys and computes the same logits."""
    from peft import PeftModel, get_peft_model_state_dict

    path = checkpoints(arch)
    model, _ = adapted(path)
    randomize_b(model)
    state = {f"{n}.{ab}.weight": getattr(m, ab).weight for n, m in lora.lora_modules(model).items()
             for ab in ("lora_A", "lora_B")}
    lora.save_adapter(state, tmp_path, r=4, alpha=8.0, dropout=0.0, base_model=str(path))

    peft_model = PeftModel.from_pretrained(reference_model(path), tmp_path).eval()
    peft_state = get_peft_model_state_dict(peft_model)
    assert set(peft_state) == {lora.PEFT_PREFIX + k for k in state}
    for key, value in state.items():
        torch.testing.assert_close(peft_state[lora.PEFT_PREFIX + key], value, rtol=0, atol=0)
    with torch.no_grad():
        ours, theirs = model(TOKENS).logits, peft_model(TOKENS).logits
        base = reference_model(path)(TOKENS).logits
    assert (ours - base).abs().max() > 0.05  # the adapter matters, so the comparison below means something
    # PEFT computes the LoRA path in fp32, we in bf16: equal up to bf16 rounding
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_our_loader_reads_our_adapter_back(checkpoints, tmp_path):
    path = checkpoints("llama")
    model, _ = adapted(path)
    randomize_b(model)
    state = {f"{n}.{ab}.weight": getattr(m, ab).weight for n, m in lora.lora_modules(model).items()
             for ab in ("lora_A", "lora_B")}
    lora.save_adapter(state, tmp_path, r=4, alpha=8.0, dropout=0.0, base_model=str(path))
    torch.manual_seed(123)  # a different A init, and B zero
    fresh, _ = adapted(path)
    lora.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS).logits, model(TOKENS).logits, rtol=0, atol=0)
    wrong_rank, _ = adapted(path, r=8)
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter(wrong_rank, tmp_path)


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
