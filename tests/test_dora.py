"""DoRA (--use_dora) against PEFT's DoRA on the same weights and rows, and through train.py, merge.py and
generate.py."""
import json

import pytest
import torch
from conftest import DEVICE, TOKENS, adapted, common, losses, make_adapter, randomize_b, reference_model, run_inprocess
from safetensors.torch import load_file

import dora
import fsdp_wrap
import lora
import merge
import peft_format
from model_loading import decoder_layer_class, load_model


def dora_model(path, quant="none"):
    """Our DoRA (r=4, alpha 8) on every linear, B and the magnitudes moved off their init."""
    model, names = adapted(path, quant, adapter=dora.DoRALinear)
    randomize_b(model)
    return model, names


def peft_dora(path, adapter_dir, quant="none", trainable=False):
    """PEFT's DoRA from our adapter folder, on transformers' own model of the same weights (4-bit: bitsandbytes')."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    load = {} if quant == "none" else {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)}
    return PeftModel.from_pretrained(reference_model(path, **load), adapter_dir, is_trainable=trainable)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_dora_at_init_equals_base(checkpoints, quant):
    """m starts at ||W|| and B at zero: the adapted model's logits are the base model's, exactly, in both paths."""
    path = checkpoints("llama")
    base = load_model(path, quant=quant, device=DEVICE, progress=False).eval()
    model, names = adapted(path, quant, adapter=dora.DoRALinear)
    assert len(names) == 14
    for module in lora.lora_modules(model).values():
        m = module.lora_magnitude_vector.weight
        assert m.dtype == torch.float32 and m.requires_grad and m.shape == (module.base.out_features,)
    with torch.no_grad():
        plain = base(TOKENS).logits
        torch.testing.assert_close(model(TOKENS).logits, plain, rtol=0, atol=0)  # unmerged: 10 rows, 64 features
    model.train()
    torch.testing.assert_close(model(TOKENS).logits, plain, rtol=0, atol=0)  # merged, as in training


def test_peft_loads_our_dora_adapter_with_same_logits(checkpoints, tmp_path):
    """PEFT loads our DoRA adapter (use_dora, lora_magnitude_vector) with no missing or unexpected keys and computes
    our logits, within the bf16 rounding our LoRA test allows."""
    from peft import get_peft_model_state_dict

    path = checkpoints("llama")
    model, _ = dora_model(path)
    state = lora.adapter_weights(lora.lora_modules(model))
    peft_format.save_adapter(state, tmp_path, r=4, alpha=8.0, dropout=0.0, base_model=str(path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == 14 and len(saved) == 42
    theirs = peft_dora(path, tmp_path).eval()
    peft_state = get_peft_model_state_dict(theirs)
    assert peft_state.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(peft_state[key], value, rtol=0, atol=0)
    with torch.no_grad():
        ours, peft, base = model(TOKENS).logits, theirs(TOKENS).logits, reference_model(path)(TOKENS).logits
    effect = (ours - base).abs().max()
    assert effect > 0.05 and (ours - peft).abs().max() < 0.1 * effect, ((ours - peft).abs().max(), effect)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_first_step_loss_and_gradients_equal_peft(checkpoints, tmp_path, quant):
    """On the same weights and rows, in training mode: our loss and the gradients of every A, B and magnitude equal
    PEFT's DoRA's, within bf16 rounding (PEFT computes DoRA's terms in fp32, we in bf16); our LoRA without the
    magnitude is far from them, so the comparison can fail."""
    path = checkpoints("llama")
    model, _ = dora_model(path, quant)
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(model)), tmp_path, r=4, alpha=8.0, dropout=0.0,
                             base_model=str(path))
    theirs = peft_dora(path, tmp_path, quant, trainable=True)
    theirs.train()
    model.train()
    ours_loss = model(TOKENS, labels=TOKENS).loss
    ours_loss.backward()
    peft_loss = theirs(TOKENS, labels=TOKENS).loss
    peft_loss.backward()
    torch.testing.assert_close(ours_loss, peft_loss, rtol=1e-2, atol=0)
    peft_grads = {n.removeprefix(peft_format.PEFT_PREFIX).replace(".default", ""): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    ours = {k: w.grad for k, w in lora.adapter_weights(lora.lora_modules(model)).items()}
    assert ours.keys() == peft_grads.keys() and len(ours) == 42
    for key, grad in ours.items():
        relative = (grad.float() - peft_grads[key].float()).norm() / peft_grads[key].float().norm()
        assert relative < 3e-2, (key, relative)


def test_merged_and_unmerged_paths_agree(checkpoints):
    """The merged GEMM (training without dropout) and PEFT's unmerged form give the same output and the same
    gradients of A, B and m, within bf16 rounding; with dropout (unmerged, PEFT's dropout form) and p -> 0 too."""
    path = checkpoints("llama")
    model, _ = dora_model(path, "nf4")
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(6, layer.base.in_features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for path_name in ("merged", "unmerged"):
        for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector.weight, x):
            p.grad = None
        out = getattr(layer, path_name)(x)
        out.float().square().sum().backward()
        results.append([out] + [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight,
                                                          layer.lora_magnitude_vector.weight, x)])
    for merged, unmerged in zip(*results):
        relative = (merged.float() - unmerged.float()).norm() / unmerged.float().norm()
        assert 0 < unmerged.float().norm() and relative < 2e-2, relative
    layer.train()
    layer.dropout = torch.nn.Dropout(1e-9)  # the dropout form, dropping (almost surely) nothing
    torch.testing.assert_close(layer.unmerged(x).float(), results[1][0].float(), rtol=2e-2, atol=2e-2)


def test_merge_equals_peft_merge_and_unload_and_the_trained_model(checkpoints, tmp_path):
    """merge.py --semantics bf16 writes PEFT's merge_and_unload weights bit for bit; --semantics dequantized gives
    the logits of the DoRA model as trained on the 4-bit base."""
    path = checkpoints("llama")
    adapter = make_adapter(path, tmp_path / "adapter", adapter=dora.DoRALinear)
    merge.merge(str(path), adapter, tmp_path / "bf16", semantics="bf16", progress=False)
    ours = {k: v for f in (tmp_path / "bf16").glob("model-*.safetensors") for k, v in load_file(f).items()}
    peft = peft_dora(path, adapter).merge_and_unload().state_dict()
    assert ours.keys() == peft.keys()
    changed = [k for k in ours if not torch.equal(ours[k], reference_model(path).state_dict()[k])]
    assert len(changed) == 14
    for key in ours:
        assert torch.equal(ours[key], peft[key].cpu()), key
    reported = merge.merge(str(path), adapter, tmp_path / "deq", semantics="dequantized", progress=False)
    trained = load_model(path, quant="nf4", device=DEVICE, progress=False).eval()
    peft_format.apply_adapter(trained, adapter)
    with torch.no_grad():
        expected, got = trained(TOKENS).logits, reference_model(tmp_path / "deq")(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert reported < 2e-2


def test_train_resume_and_generate_with_dora(checkpoints, tmp_path):
    """train.py --use_dora trains the magnitudes (they leave ||W||), saves them, and a resumed run continues with the
    uninterrupted run's losses exactly; generate.py applies the adapter as DoRA."""
    import generate

    path = checkpoints("llama")
    args = common(path, tmp_path / "run", steps=4) + ["--use_dora", "--save_every", "2"]
    first = run_inprocess(args)
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    start = {k: v for k, v in load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").items()}
    magnitudes = [k for k in saved if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 14 and all(not torch.equal(saved[k], start[k]) for k in magnitudes)
    (tmp_path / "run" / "checkpoint-4").rename(tmp_path / "run" / "later")
    again = run_inprocess(args + ["--resume", "auto"])
    assert [h["step"] for h in again] == [3, 4] and losses(again) == losses(first)[2:]
    model, _ = generate.load(str(path), str(tmp_path / "run"), None, DEVICE)
    assert sum(isinstance(m, dora.DoRALinear) for m in model.modules()) == 14
    with torch.no_grad():  # generate.py's model is PEFT's DoRA on the 4-bit base the run trained on
        ours, peft = model(TOKENS).logits, peft_dora(path, tmp_path / "run", "nf4").eval()(TOKENS).logits
        base = load_model(path, quant="nf4", device=DEVICE, progress=False).eval()(TOKENS).logits
    effect = (peft - base).abs().max()
    assert effect > 0.05 and (ours - peft).abs().max() < 0.1 * effect, ((ours - peft).abs().max(), effect)


def test_dora_on_moe_experts_is_refused(checkpoints):
    """PEFT has no DoRA on the experts' tensors (its ParamWrapper refuses use_dora), and neither do we: one line."""
    import train

    with pytest.raises(ValueError, match="--use_dora applies to linears"):
        train.parse_config(["--model", str(checkpoints("mixtral")), "--lora_targets", "all-linear,experts",
                            "--use_dora"])


def test_dora_at_init_is_the_base_within_bf16_under_fsdp(checkpoints, process_group):
    """Wrapped as train.py wraps it, DoRA at init computes LoRA at init (the base) up to bf16 rounding of m: FSDP's
    mixed precision casts every weight of the LoRA unit to bf16, the magnitudes too (as it would PEFT's), so m / ||W||
    is 1 within 2^-9, not exactly."""
    ids = torch.randint(4, 400, (2, 40), device=DEVICE)
    loss = {}
    for adapter in (lora.LoRALinear, dora.DoRALinear):
        torch.manual_seed(0)
        model, _ = adapted(checkpoints("llama"), "nf4", adapter=adapter)
        model = fsdp_wrap.wrap_model(model.train(), decoder_layer_class(model), DEVICE, wrapping=fsdp_wrap.Wrapping())
        loss[adapter] = model(input_ids=ids, labels=ids).detach()
    torch.testing.assert_close(loss[dora.DoRALinear], loss[lora.LoRALinear], rtol=2e-3, atol=0)


def test_applied_adapter_is_in_eval_mode_of_its_model(checkpoints, tmp_path):
    """generate.load and merge.py's check put a dropout-trained adapter on an eval-mode model: the injected adapters
    must be in eval mode too (apply_adapter's docstring: "dropout is off in eval mode"), or every forward drops out."""
    from model_loading import fingerprint

    path = checkpoints("llama")
    model, _ = adapted(path, "nf4", adapter=dora.DoRALinear)
    randomize_b(model)
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(model)), tmp_path, r=4, alpha=8.0, dropout=0.1,
                             base_model=str(path), base_fingerprint=fingerprint(path))
    trained = load_model(path, quant="nf4", device=DEVICE, progress=False).eval()
    peft_format.apply_adapter(trained, tmp_path)
    assert not any(m.training for m in lora.lora_modules(trained).values())
    with torch.no_grad():
        torch.testing.assert_close(trained(TOKENS).logits, trained(TOKENS).logits, rtol=0, atol=0)


def test_merge_check_of_a_dropout_adapter(checkpoints, tmp_path):
    """merge.py's reported difference to the model as trained is the merge's error, not dropout noise."""
    from model_loading import fingerprint

    path = checkpoints("llama")
    model, _ = adapted(path, adapter=dora.DoRALinear)
    randomize_b(model)
    adapter = tmp_path / "adapter"
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(model)), adapter, r=4, alpha=8.0, dropout=0.1,
                             base_model=str(path), base_fingerprint=fingerprint(path))
    (adapter / "train_config.json").write_text(json.dumps({"model": str(path), "quant": "nf4", "lora_rank": 4}))
    reported = merge.merge(str(path), adapter, tmp_path / "deq", semantics="dequantized", progress=False)
    assert reported < 2e-2


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_two_ranks_match_one_rank_with_dora(checkpoints, tmp_path):
    """2 ranks of batch 4 give the losses and the adapter (magnitudes included, gathered from their fp32 units) of
    1 process of batch 8, with --use_dora."""
    from conftest import run_torchrun

    path = checkpoints("llama")
    two = run_torchrun(common(path, tmp_path / "two", steps=4) + ["--batch_size", "4", "--use_dora"], nproc=2)
    one = run_inprocess(common(path, tmp_path / "one", steps=4) + ["--batch_size", "8", "--use_dora"])
    torch.testing.assert_close(losses(two), losses(one), rtol=5e-3, atol=0)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and sum(k.endswith(".lora_magnitude_vector") for k in a) == 14
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() / torch.cat([a[k].flatten() for k in a]).norm()
    assert diff < 2e-2, diff


@pytest.mark.parametrize("use_dora", [True, False])
def test_a_config_that_disagrees_with_the_tensors_is_named_before_loading(checkpoints, tmp_path, use_dora):
    """use_dora: true beside tensors without magnitudes (or false beside a DoRA adapter's) is refused from the
    header, naming use_dora and the fix, before any model loads."""
    path = checkpoints("llama")
    adapter = make_adapter(path, tmp_path / "a", adapter=dora.DoRALinear if not use_dora else lora.LoRALinear)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": use_dora}))
    with pytest.raises(lora.AdapterError, match=rf"says use_dora: {use_dora}, but the adapter's tensors hold "
                                                rf"{'no ' if use_dora else ''}lora_magnitude_vector.*write use_dora: "
                                                rf"{str(not use_dora).lower()} in it"):
        peft_format.read_adapter_config(adapter)
