"""Merging: the merged checkpoint is the model as trained (or PEFT's merge), written in bounded memory."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (ARCHS, DEVICE, ROOT, SHAPE, TOKENS, common, make_adapter, reference_model, run_inprocess,
                      tiny_config)
from transformers import AutoTokenizer
from safetensors.torch import load_file

import data
import generate
import lora
import merge
import moe_lora
import peft_format
from builtin import write_random_checkpoint
from model_loading import index_weights, load_model


@pytest.fixture(scope="module")
def merged(checkpoints, tmp_path_factory):
    """(arch, semantics) -> (base, adapter, merged folder, reported logit difference), each merge made once."""
    made = {}

    def get(arch, semantics):
        if arch not in made:
            made[arch] = make_adapter(checkpoints(arch), tmp_path_factory.mktemp(f"{arch}-adapter"))
        key = (arch, semantics)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-{semantics}") / "merged"
            diff = merge.merge(str(checkpoints(arch)), made[arch], out, semantics=semantics, progress=False)
            made[key] = (checkpoints(arch), made[arch], out, diff)
        return made[key]

    return get


def merged_state(out):
    return {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("semantics", ["bf16", "dequantized"])
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_logits_equal_base_plus_adapter(merged, arch, semantics):
    """from_pretrained(MERGED) gives our base + adapter model's logits: bf16 base (bf16), nf4 base (dequantized)."""
    base, adapter, out, reported = merged(arch, semantics)
    ours = load_model(base, quant="none" if semantics == "bf16" else "nf4", device=DEVICE, progress=False).eval()
    peft_format.apply_adapter(ours, adapter)
    with torch.no_grad():
        expected, got = ours(TOKENS).logits, reference_model(out)(TOKENS).logits
        plain = reference_model(base)(TOKENS).logits
    assert (expected - plain).abs().max() > 0.05  # the adapter matters, so the comparison below means something
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # bf16 rounding of W + BA vs the separate path
    if semantics == "dequantized":  # the merge's own check compares against the nf4 model as trained: same tolerance
        assert reported < 2e-2, reported


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_weights_equal_formula_and_peft(merged, arch):
    """Each adapted weight is bf16(W + B @ A * alpha/r); PEFT's merge_and_unload gives the same, bit for bit, and the
    dequantized merge differs only in W, which is then exactly the 4-bit base our loader trains against."""
    from bitsandbytes.functional import dequantize_4bit
    from peft import PeftModel

    base, adapter, out_bf16, _ = merged(arch, "bf16")
    ours = {"bf16": merged_state(out_bf16), "dequantized": merged_state(merged(arch, "dequantized")[2])}
    original = merged_state(base)
    factors = load_file(adapter / "adapter_model.safetensors")
    nf4 = load_model(base, quant="nf4", device="cpu", progress=False)
    peft = PeftModel.from_pretrained(reference_model(base).cpu(), adapter).merge_and_unload().state_dict()
    assert ours["bf16"].keys() == ours["dequantized"].keys() == original.keys()
    adapted_names = {n for n, m in nf4.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(adapted_names) == 14
    for name, w in original.items():
        path = name.removesuffix(".weight")
        if path not in adapted_names:  # embeddings, norms, biases: copied
            assert torch.equal(ours["bf16"][name], w) and torch.equal(ours["dequantized"][name], w), name
            continue
        a, b = (factors[f"{peft_format.PEFT_PREFIX}{path}.lora_{x}.weight"] for x in "AB")
        delta = b @ a * 2.0  # alpha / r = 8 / 4
        layer = nf4.get_submodule(path)
        w_4bit = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.equal(ours["bf16"][name], (w.float() + delta).bfloat16()), name
        assert torch.equal(peft[name], ours["bf16"][name]), name
        assert torch.equal(ours["dequantized"][name], (w_4bit + delta).bfloat16()), name


def test_output_is_a_complete_hf_folder(merged):
    """The folder holds indexed shards, config, tokenizer and a model card naming base, adapter and training config."""
    from transformers import AutoTokenizer

    base, adapter, out, reported = merged("llama", "bf16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = sum(f.stat().st_size for f in out.glob("model-*.safetensors"))
    assert set(index["weight_map"].values()) == {f.name for f in out.glob("model-*.safetensors")}
    assert 0 < index["metadata"]["total_size"] < sizes  # data plus one small header per shard
    assert index_weights(out).keys() == index_weights(base).keys()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tokenizer, reference = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base)
    assert tokenizer("Name the capital.").input_ids == reference("Name the capital.").input_ids
    card = (out / "README.md").read_text()
    assert str(base) in card and str(adapter) in card and '"quant": "nf4"' in card and f"{reported:.4g}" in card
    assert not list(out.parent.glob(".merged.tmp-*"))  # the temporary folder was renamed, not left behind


def test_merge_memory_stays_near_one_tensor(tmp_path):
    """Merging a 190 MB sharded checkpoint grows peak RSS by well under its size: tensors are streamed one at a time."""
    from transformers import LlamaConfig

    # 24 layers of 8 MB: the model is large next to any one tensor, as a real one is
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=8)
    base = write_random_checkpoint(config, tmp_path / "base", max_shard_size="16MB")
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    adapter = make_adapter_from_shapes(base, tmp_path / "adapter")
    small_base = write_random_checkpoint(tiny_config("llama"), tmp_path / "small")
    small_adapter = make_adapter_from_shapes(small_base, tmp_path / "small-adapter")
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import merge
# A small merge first, so that imports and one-time allocations are not counted
merge.merge({str(small_base)!r}, {str(small_adapter)!r}, {str(tmp_path / "small-out")!r}, verify=False, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge.merge({str(base)!r}, {str(adapter)!r}, {str(tmp_path / "out")!r}, verify=False, progress=False)
print("GROWTH", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    # glibc keeps freed blocks under its adaptive mmap threshold (up to 32 MB) for reuse instead of returning them,
    # which inflates the RSS of a run of many small tensors; a fixed threshold measures what the merge holds. (A real
    # model's tensors are far above 32 MB, so glibc returns them anyway.)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split("GROWTH")[-1])
    assert model_bytes > 150e6 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert growth < model_bytes / 6, (growth, model_bytes)


def make_adapter_from_shapes(base, out, r=4):
    """Random LoRA factors for every default target, from the base's shapes alone (no model is built)."""
    from transformers import AutoConfig

    targets = moe_lora.targets_on(AutoConfig.from_pretrained(base), lora.ALL_LINEAR)
    state = {}
    for name, module in targets.items():
        state[f"{name}.lora_A.weight"] = torch.randn(r, module.in_features) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, r) * 0.1
    peft_format.save_adapter(state, out, r=r, alpha=2.0 * r, dropout=0.0, base_model=str(base))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing written


def test_adapter_for_another_base(merged, tmp_path):
    """An adapter trained on another base is refused, naming the weight that does not fit, even when
    --allow_other_base lets a base other than its own through."""
    from transformers import LlamaConfig

    _, adapter, _, _ = merged("llama", "bf16")
    wider = write_random_checkpoint(LlamaConfig(**{**SHAPE, "intermediate_size": 192}), tmp_path / "wider")
    with pytest.raises(merge.MergeError, match=r"does not fit model\.layers\.0\.mlp\.\w+_proj\.weight .*another base"):
        merge.merge(str(wider), adapter, tmp_path / "out", progress=False, allow_other_base=True)
    shallower = write_random_checkpoint(LlamaConfig(**{**SHAPE, "num_hidden_layers": 1}), tmp_path / "shallower")
    with pytest.raises(merge.MergeError, match=r"adapts model\.layers\.1\.\S+, which this base model does not have"):
        merge.merge(str(shallower), adapter, tmp_path / "out", progress=False, allow_other_base=True)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_of_the_same_shapes(checkpoints, tmp_path, monkeypatch):
    """Defect 2: an adapter trained on one base is refused, before any model loads, on another of the same shapes (a
    base/instruct pair: merge.py; a Mistral for a Llama: generate.py), naming both bases and their fingerprints;
    --allow_other_base merges it on purpose, with a warning; an adapter that records no base is merged with a warning.
    """
    import re

    import cli
    import generate
    import model_loading
    from builtin import make_tokenizer
    from safetensors.torch import save_file

    base = checkpoints("llama")
    run = make_adapter(base, tmp_path / "run")  # recording its base as train.py does (test_checkpoint_folders_...)
    instruct = write_random_checkpoint(tiny_config("llama"), tmp_path / "instruct", "40KB", seed=2,
                                       tokenizer=make_tokenizer())

    def refusal(other):
        return (rf"the adapter in {re.escape(str(run))} was trained on {re.escape(str(base))} \(fingerprint "
                rf"[0-9a-f]{{16}}\), not on --model {re.escape(str(other))} \(fingerprint [0-9a-f]{{16}}\): pass the "
                r"base it was trained on, or --allow_other_base to apply it to this one on purpose")

    with monkeypatch.context() as patched:
        patched.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
        with pytest.raises(merge.MergeError, match=refusal(instruct)):
            merge.merge(str(instruct), run, tmp_path / "out", progress=False)
        with pytest.raises(cli.Refusal, match=refusal(checkpoints("mistral"))):  # said in one line, no traceback
            generate.main(["--model", str(checkpoints("mistral")), "--adapter", str(run), "--prompt", "hi"])
    assert not (tmp_path / "out").exists()

    with pytest.warns(UserWarning, match=r"--allow_other_base: the adapter in .* trained on .* is applied to --model"):
        merge.merge(str(instruct), run, tmp_path / "out", allow_other_base=True, verify=False, progress=False)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    factors = run / "adapter_model.safetensors"
    save_file(load_file(factors), factors, metadata={"format": "pt"})  # as PEFT writes it: no base recorded
    (run / "trainer_state.json").write_text(json.dumps({"base_fingerprint": model_loading.fingerprint(base)}))
    with pytest.raises(merge.MergeError, match=refusal(instruct)):  # a checkpoint saved before adapters recorded it
        merge.merge(str(instruct), run, tmp_path / "out2", progress=False)
    (run / "trainer_state.json").unlink()
    unrecorded = (rf"the adapter in {re.escape(str(run))} does not record the base it was trained on \(written by "
                  rf"another tool\?\): --model {re.escape(str(instruct))} is not checked against it")
    with pytest.warns(UserWarning, match=unrecorded):
        merge.merge(str(instruct), run, tmp_path / "out2", verify=False, progress=False)


def test_rank_in_config_other_than_the_tensors(merged, tmp_path, monkeypatch):
    """Defect 26: an adapter_config.json whose r is not its tensors' rank is refused by merge and generate, before
    the model loads, naming both ranks, not blamed on another base."""
    import shutil

    import generate
    import model_loading

    base, adapter, _, _ = merged("llama", "bf16")
    shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    refusal = (r"adapter_config\.json says r=8, but the adapter's tensors have rank 4 \(base_model\.model\.model\."
               r"layers\.0\.mlp\.down_proj\.lora_A\.weight is \[4, 128\]\)")
    with pytest.raises(ValueError, match=refusal):
        merge.merge(str(base), tmp_path / "adapter", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=refusal):
        generate.main(["--model", str(base), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi"])
    assert not (tmp_path / "out").exists()


def test_targets_in_config_other_than_the_tensors(merged, tmp_path, monkeypatch):
    """An adapter_config.json whose target_modules leave out layers the tensors adapt (PEFT would load the adapter
    without them) is refused by merge, also with --no-verify, and by generate, before the model loads, naming the
    layer and target_modules, not blamed on another base."""
    import shutil

    import generate
    import model_loading

    base, adapter, _, _ = merged("llama", "bf16")
    shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    refusal = r"target_modules \['q_proj'\], but the adapter's tensors adapt model\.layers\.0\.\S+ too"
    with pytest.raises(ValueError, match=refusal):
        merge.merge(str(base), tmp_path / "adapter", tmp_path / "out", verify=False, progress=False)
    with pytest.raises(ValueError, match=refusal):
        generate.main(["--model", str(base), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi"])
    assert not (tmp_path / "out").exists()


def test_missing_adapter(checkpoints, tmp_path):
    """A folder without adapter files is refused by merge and by generate, before any model loads."""
    import generate

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_config.json").write_text("{}")
    with pytest.raises(lora.AdapterError, match=r"no adapter_model.safetensors in .*run: pass --adapter"):
        merge.main(["--model", str(checkpoints("llama")), "--adapter", str(tmp_path / "run"),
                    "--out", str(tmp_path / "o")])
    with pytest.raises(lora.AdapterError, match=r"no adapter_config.json in .*nowhere"):
        generate.main(["--model", str(checkpoints("llama")), "--adapter", str(tmp_path / "nowhere"), "--prompt", "hi"])


def test_existing_output_needs_overwrite(merged, tmp_path):
    """An existing --out is refused without --overwrite, replaced with it, and never deleted unless it is a model."""
    base, adapter, _, _ = merged("llama", "bf16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older merge")
    args = ["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--no-verify"]
    with pytest.raises(merge.MergeError, match="not a model folder"):
        merge.main(args + ["--overwrite"])  # a folder of something else: refused even with --overwrite
    (out / "config.json").write_text("{}")
    with pytest.raises(merge.MergeError, match="already exists; pass --overwrite"):
        merge.main(args)
    merge.main(args + ["--overwrite"])
    assert not (out / "stale.txt").exists() and (out / "model.safetensors.index.json").is_file()
    with pytest.raises(merge.MergeError, match="is the base model or adapter folder"):
        merge.main(["--model", str(base), "--adapter", str(adapter), "--out", str(adapter), "--overwrite"])


@pytest.mark.parametrize("quant", ["fp4", "none"])
def test_checkpoint_folders_merge_and_sample_on_the_base_they_were_trained_on(checkpoints, tmp_path, quant):
    """merge.py and generate.py, given a checkpoint-N of a --quant fp4 or none run, use that base, not nf4: the
    merged weight is that base's W + B @ A * alpha/r, and the sampled model holds that base."""
    import generate
    import model_loading
    import quantization

    base = checkpoints("llama")
    run_inprocess(common(base, tmp_path / "run", steps=1) + ["--quant", quant, "--save_every", "1",
                                                                "--batch_size", "4"])
    ckpt, name = tmp_path / "run" / "checkpoint-1", "model.layers.0.mlp.up_proj"
    base_fingerprint = model_loading.fingerprint(base)  # what merge.py and generate.py compare with their --model
    assert peft_format.trained_fingerprint(ckpt) == peft_format.trained_fingerprint(tmp_path / "run") == base_fingerprint
    net, _ = generate.load(str(base), str(ckpt), None, DEVICE)
    layer = net.get_submodule(name).base
    assert layer.weight.quant_type == quant if quant != "none" else not quantization.is_4bit(layer)

    merge.merge(str(base), ckpt, tmp_path / "merged", progress=False, verify=False)
    factors = load_file(ckpt / "adapter_model.safetensors")
    a, b = (factors[peft_format.peft_key(f"{name}.{ab}.weight")].to(DEVICE) for ab in lora.FACTORS)
    trained = load_model(base, quant=quant, device=DEVICE, progress=False).get_submodule(name)
    w = trained.weight if quant == "none" else quantization.dequantize(trained.weight, trained)
    expected = (w.float() + b @ a * 2.0).bfloat16()  # alpha / r = 8 / 4
    torch.testing.assert_close(merged_state(tmp_path / "merged")[f"{name}.weight"].to(DEVICE), expected,
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The prompt format travels with the result (issue 25)

# Zephyr's layout, each turn closed by <unk>: a model with a chat template of its own, and an end-of-turn token
OWN_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<unk>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def own_template(checkpoints, tmp_path_factory):
    """The tiny Llama, its tokenizer given a chat template of its own."""
    import shutil

    out = tmp_path_factory.mktemp("own-template") / "llama"
    shutil.copytree(checkpoints("llama"), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["own template", "--chat_template chatml", "alpaca fallback"])
def test_the_prompt_format_travels(checkpoints, own_template, tmp_path, capsys, case):
    """The run folder, each checkpoint-N and the merged folder hold a tokenizer whose apply_chat_template renders a
    row as training did: with the model's own template, --chat_template's, or (no template) the alpaca template.
    generate.py renders an instruction record as the run did, from the adapter or the merged folder, and the samples
    written during training are generate.py's."""
    base = own_template if case == "own template" else checkpoints("llama")
    flags = ["--chat_template", "chatml"] if case.startswith("--") else []
    dataset, prompts = tmp_path / "d.jsonl", tmp_path / "prompts.txt"
    dataset.write_text("".join(json.dumps({"instruction": "Name the capital.", "input": country, "output": city}) + "\n"
                               for country, city in [("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
                                                     ("Mali", "Bamako")]))
    record = json.dumps({"instruction": "Name the capital.", "input": "Peru"})
    prompts.write_text(record + "\n")
    out, merged_dir = tmp_path / "run", tmp_path / "merged"
    run_inprocess(common(base, out, steps=2) + ["--dataset", str(dataset), "--batch_size", "2", "--seq_len", "128",
                                                "--save_every", "1", "--system_prompt", "Be brief.", "--sample_prompts",
                                                str(prompts), "--sample_tokens", "4", *flags])
    merge.merge(str(base), out, merged_dir, verify=False, progress=False)

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows, _ = data.prepare(data.DataConfig(dataset=str(dataset), seq_len=128, chat_template=flags[-1] if flags else "",
                                           system_prompt="Be brief."), tokenizer, log=lambda *_: None)
    user = "Name the capital.\n\n" + ("### Input:\n" if case == "alpaca fallback" else "") + "Peru"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user},
                {"role": "assistant", "content": "Lima"}]
    for folder in (out, out / "checkpoint-1", merged_dir):
        saved = AutoTokenizer.from_pretrained(folder)
        assert saved.encode(saved.apply_chat_template(messages, tokenize=False), add_special_tokens=False) == \
            rows[0]["input_ids"], folder

    prompt = rows[0]["input_ids"][:next(i for i, label in enumerate(rows[0]["labels"]) if label != data.IGNORE)]
    capsys.readouterr()
    completions = [generate.main(["--model", str(model), "--prompt", record, "--max_new_tokens", "4", *adapter])
                   for model, adapter in [(base, ["--adapter", str(out)]), (merged_dir, [])]]
    assert capsys.readouterr().out.count(f"### prompt\n{tokenizer.decode(prompt)}\n### completion") == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [samples[-1]["step"], samples[-1]["completion"]] == [2, completions[0][0]]


# ---------------------------------------------------------------------------------------------------------------------
# A merge that cannot be right writes nothing


def test_nan_in_a_4bit_base_is_refused_naming_the_weight_and_nothing_is_written(checkpoints, tmp_path):
    """A quantize.py base whose nested_absmax is NaN is refused, with or without --verify, naming the weight that
    dequantizes to NaN and its file; --out is never created."""
    import quantize
    from conftest import editable_copy

    base = checkpoints("llama")
    adapter = make_adapter(base, tmp_path / "run")
    quantize.quantize_checkpoint(str(base), tmp_path / "q", progress=False)
    qnan, edit = editable_copy(tmp_path / "q", tmp_path / "Qnan")
    name = "model.layers.0.mlp.down_proj.weight"
    edit(f"{name}.nested_absmax", lambda tensor: torch.full_like(tensor, float("nan")))
    shard = index_weights(qnan)[name].file
    for verify in (True, False):
        with pytest.raises(merge.MergeError) as refusal:
            merge.merge(str(qnan), adapter, tmp_path / "mgnan", verify=verify, progress=False)
        assert str(refusal.value) == (f"{name} in {shard} dequantizes to NaN or inf: the base is damaged; download or "
                                      "quantize it again")
        assert not (tmp_path / "mgnan").exists() and not list(tmp_path.glob(".mgnan.tmp-*"))


@pytest.mark.parametrize("norm, dtype, message", [
    (6e4, "fp16", "the merged model's logits are not finite (NaN or inf) on the check's 32 tokens, where the model as "
                  "trained gives finite ones: its weights are finite, so its activations overflow --dtype fp16; merge "
                  "with --dtype bf16, the range of the model as trained"),
    (3e38, "bf16", "the model as trained (base + adapter): the logits are not finite (NaN or inf): the first module "
                   "whose output is not finite is model.norm. A weight is damaged, in --model's checkpoint or in the "
                   "adapter: download or write it again"),
], ids=["merged fp16", "as trained bf16"])
def test_logits_that_are_not_finite_are_a_failure_not_a_figure(checkpoints, tmp_path, norm, dtype, message):
    """Finite weights whose logits are not finite: a final norm of 6 * 10^4 overflows the merged model in fp16 (not
    the model as trained), one of 3 * 10^38 overflows bf16 in the model as trained. The check refuses, naming the
    cause, never reporting a NaN difference; --out is never created."""
    from conftest import editable_copy

    base, edit = editable_copy(checkpoints("llama"), tmp_path / "loud")
    edit("model.norm.weight", lambda tensor: torch.full_like(tensor, norm))
    adapter = make_adapter(base, tmp_path / "run")
    with pytest.raises(merge.MergeError) as refusal:
        merge.merge(str(base), adapter, tmp_path / "out", dtype=dtype, progress=False)
    assert str(refusal.value) == message
    assert not (tmp_path / "out").exists()


def test_a_second_writer_into_the_same_out_is_refused(merged, tmp_path, monkeypatch):
    """Two merges into one new --out: the one that starts while the other writes is refused at once, and one whose
    check passed before the other finished is refused at its start; --out holds the first merge, unchanged."""
    from safetensors.torch import save_file

    base, adapter, _, _ = merged("llama", "bf16")
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    factors = load_file(other / "adapter_model.safetensors")  # another adapter: B doubled
    save_file({k: v * 2 if ".lora_B." in k else v for k, v in factors.items()}, other / "adapter_model.safetensors",
              metadata={"format": "pt", peft_format.BASE_FINGERPRINT: peft_format.trained_fingerprint(adapter)})
    race = tmp_path / "race"
    real_write = merge.write_weights

    def second_merge_while_writing(*args, **kwargs):  # merge.py in another process, into the same --out
        proc = subprocess.run([sys.executable, str(ROOT / "merge.py"), "--model", str(base), "--adapter", str(other),
                               "--out", str(race), "--no-verify"], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "saved to" not in proc.stdout
        assert (f"--out {race} is being written by another merge.py or quantize.py: wait for it to end, or choose "
                "another --out") in proc.stderr, proc.stderr[-3000:]
        return real_write(*args, **kwargs)

    monkeypatch.setattr(merge, "write_weights", second_merge_while_writing)
    merge.merge(str(base), adapter, race, verify=False, progress=False)
    first = merged_state(race)
    real_read = merge.read_base

    def finished_meanwhile(*args, **kwargs):  # this merge's check of --out passed; another finishes before it writes
        monkeypatch.setattr(merge, "read_base", real_read)
        merge.merge(str(base), adapter, race, verify=False, progress=False)
        return real_read(*args, **kwargs)

    shutil.rmtree(race)
    monkeypatch.setattr(merge, "read_base", finished_meanwhile)
    with pytest.raises(merge.MergeError) as refusal:
        merge.merge(str(base), other, race, verify=False, progress=False)
    assert str(refusal.value) == (f"--out {race} was written by another merge.py or quantize.py after this one "
                                  "checked it: choose another --out, or run again (with --overwrite to replace it)")
    assert merged_state(race).keys() == first.keys()
    assert all(torch.equal(merged_state(race)[k], v) for k, v in first.items())
