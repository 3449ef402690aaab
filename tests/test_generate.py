"""Sampling: greedy equals transformers' generate, seeded sampling repeats itself, and the samples a training run
writes are those of the adapters it saves."""
import json

import pytest
import torch
from conftest import (ARCHS, DEVICE, common, hf_greedy, losses, make_adapter, reference_model,
                      refused_before_loading, run_inprocess, run_torchrun)
from transformers import AutoTokenizer

import cli
import generate
import lora
import merge
import peft_format
import train
from model_loading import load_model

# an instruction record (rendered with the training template), plain text, and a record without input
PROMPTS = ['{"instruction": "Name the capital.", "input": "Peru"}', "Once upon a time",
           '{"instruction": "Give the opposite."}']
SAMPLE_TOKENS = 16  # during training; enough to tell models apart


def test_prompts_are_rendered_as_training_renders_rows(checkpoints):
    """An instruction record, or a prompt record, is the prompt of the alpaca, or prompt_completion, row data.tokenize
    trains on, in the run's format (alpaca, or chat with its system prompt); a {"messages": [...]} prompt is the chat
    template's rendering with the generation prompt; anything else is BOS and the text, as text rows are trained."""
    import data

    tokenizer = AutoTokenizer.from_pretrained(checkpoints("llama"))
    rows = {"alpaca": ({"instruction": "Name the capital.", "input": "Peru"}, {"output": "Lima"}),
            "prompt_completion": ({"prompt": "The capital of Peru is"}, {"completion": " Lima"})}

    def training_prompt(fmt, **rendering) -> list[int]:  # the row's ids before its first trained token
        record, answer = rows[fmt]
        row = data.tokenize({**record, **answer}, tokenizer, 128, fmt, **rendering)
        return row["input_ids"][:next(i for i, label in enumerate(row["labels"]) if label != data.IGNORE)]

    for fmt, (record, _) in rows.items():
        assert generate.prompt_ids(json.dumps(record), tokenizer) == training_prompt(fmt, prompt_format="alpaca")
    tokenizer.chat_template = data.CHATML  # auto: chat from here on
    for fmt, (record, _) in rows.items():
        assert generate.prompt_ids(json.dumps(record), tokenizer, system_prompt="Be brief.") == training_prompt(
            fmt, prompt_format="chat", system_prompt="Be brief.")
    messages = '{"messages": [{"role": "user", "content": "Capital of Peru?"}]}'
    assert tokenizer.decode(generate.prompt_ids(messages, tokenizer)) == ("<|im_start|>user\nCapital of Peru?"
                                                                          "<|im_end|>\n<|im_start|>assistant\n")
    for text in ("Once upon a time", '{"not": "an instruction"}'):
        assert generate.prompt_ids(text, tokenizer) == [tokenizer.bos_token_id] + tokenizer.encode(
            text, add_special_tokens=False)


def test_generation_stops_at_the_templates_end_of_turn(checkpoints):
    """Sampling stops at the special token that the chat template closes each turn with, as at EOS: a model steered
    to write that token first and 'Lima' after it completes with nothing, where without the template it goes on."""
    from tokenizers import AddedToken

    path = checkpoints("llama")
    model, tokenizer = reference_model(path), AutoTokenizer.from_pretrained(path)
    end, lima = tokenizer.convert_tokens_to_ids(["Paris", "Lima"])
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("Paris", special=True)]})  # its own id
    steps = []

    def steer(module, args, logits):  # the first new token is `end`, every later one Lima
        logits[:, -1, lima if steps else end] += 1e4
        steps.append(1)
        return logits

    model.lm_head.register_forward_hook(steer)
    assert generate.stop_ids(model, tokenizer) == {tokenizer.eos_token_id}
    assert generate.sample(model, tokenizer, [PROMPTS[1]], 4) == ["LimaLimaLima"]  # Paris, special, is not shown
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + 'Paris' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    steps.clear()
    assert generate.stop_ids(model, tokenizer) == {tokenizer.eos_token_id, end}
    assert generate.sample(model, tokenizer, [PROMPTS[1]], 4) == [""]


def test_generation_stops_at_an_end_of_turn_of_several_tokens(checkpoints):
    """--chat_template chatml on a tokenizer without ChatML's tokens (a base model's): '<|im_end|>' is several
    tokens, which training teaches the model to write; sampling stops there as at a special end-of-turn token, and
    the completion ends before it. Without the template the same tokens go on."""
    import data

    path = checkpoints("llama")
    model, tokenizer = reference_model(path), AutoTokenizer.from_pretrained(path)
    steered = tokenizer.encode("Lima<|im_end|>\nLima", add_special_tokens=False)
    assert len(tokenizer.encode("<|im_end|>", add_special_tokens=False)) > 1  # not one token here
    steps = []

    def steer(module, args, logits):  # the new tokens are `steered`
        logits[:, -1, steered[min(len(steps), len(steered) - 1)]] += 1e4
        steps.append(1)
        return logits

    model.lm_head.register_forward_hook(steer)
    n = len(steered)
    assert generate.sample(model, tokenizer, [PROMPTS[1]], n) == [tokenizer.decode(steered)]
    tokenizer.chat_template = data.CHATML
    steps.clear()
    assert generate.sample(model, tokenizer, [PROMPTS[1]], n) == ["Lima"]
    assert len(steps) < n  # stopped, not cut afterwards


def test_a_messages_prompt_on_a_model_without_a_template_says_what_to_pass(checkpoints, tmp_path, monkeypatch):
    """generate.py refuses a {"messages": [...]} prompt where the tokenizer has no chat template, saying to pass
    --chat_template, before the model loads; train.py refuses such a --sample_prompts line before loading too."""
    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    path, messages = checkpoints("llama"), '{"messages": [{"role": "user", "content": "hi"}]}'
    refusal = ('a {"messages": [...]} prompt is rendered by a chat template, and the tokenizer in '
               f"{path} has none: pass --chat_template chatml (or a Jinja template, or a file holding one)")
    with pytest.raises(ValueError) as e:
        generate.main(["--model", str(path), "--prompt", messages])
    assert str(e.value) == refusal
    (tmp_path / "text.jsonl").write_text('{"text": "plain words"}\n' * 8)  # rows that leave the tokenizer as it was
    (tmp_path / "prompts.txt").write_text(messages + "\n")
    with pytest.raises(ValueError) as e:
        refused_before_loading(monkeypatch, tmp_path, path, tokenizes=True, args=(
            "--dataset", str(tmp_path / "text.jsonl"), "--sample_prompts", str(tmp_path / "prompts.txt")))
    assert str(e.value) == refusal


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate(checkpoints, arch):
    """Greedy sampling of a batch equals transformers' generate on the same weights, and each prompt alone its row."""
    path = checkpoints(arch)
    model, tokenizer = reference_model(path), AutoTokenizer.from_pretrained(path)
    ours = generate.sample(model, tokenizer, PROMPTS, max_new_tokens=24)
    assert ours == hf_greedy(model, tokenizer, PROMPTS, max_new_tokens=24)
    assert [generate.sample(model, tokenizer, [p], max_new_tokens=24)[0] for p in PROMPTS] == ours  # padding is inert
    assert max(len(c) for c in ours) > 10  # not a trivial comparison of empty strings


def test_seeded_sampling_repeats(checkpoints):
    """Temperature sampling under a fixed seed gives the same text every time; another seed gives other text."""
    path = checkpoints("llama")
    model, tokenizer = reference_model(path), AutoTokenizer.from_pretrained(path)
    draw = [generate.sample(model, tokenizer, PROMPTS, 24, temperature=1.0, seed=seed) for seed in (0, 0, 1)]
    assert draw[0] == draw[1]
    assert draw[0] != draw[2]
    assert draw[0] != generate.sample(model, tokenizer, PROMPTS, 24)  # and it is not greedy decoding


def test_cli_samples_merged_folder_and_base_with_adapter(checkpoints, tmp_path):
    """generate.py on a merged folder gives transformers' greedy output; with --adapter, the model as trained (nf4)."""
    base = checkpoints("qwen2")
    adapter = make_adapter(base, tmp_path / "adapter")
    merge.merge(str(base), adapter, tmp_path / "merged", verify=False, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    flags = [arg for p in PROMPTS for arg in ("--prompt", p)] + ["--max_new_tokens", "16"]

    from_merged = generate.main(["--model", str(tmp_path / "merged")] + flags)
    assert from_merged == hf_greedy(reference_model(tmp_path / "merged"), tokenizer, PROMPTS, 16)

    as_trained = load_model(base, quant="nf4", device=DEVICE, progress=False)
    peft_format.apply_adapter(as_trained, adapter)
    from_adapter = generate.main(["--model", str(base), "--adapter", str(adapter)] + flags)
    assert from_adapter == generate.sample(as_trained, tokenizer, PROMPTS, 16)


def test_experts_adapter_on_a_dense_model_names_the_mismatch(checkpoints, tmp_path):
    """Defect 23: an adapter of MoE experts applied to a dense model is refused as an adapter for another base,
    naming what it adapts, never a --lora_targets flag that was not given."""
    adapter = make_adapter(checkpoints("mixtral"), tmp_path / "adapter", targets=(lora.EXPERTS,))
    with pytest.raises(ValueError) as refusal:
        generate.main(["--model", str(checkpoints("llama")), "--adapter", str(adapter), "--allow_other_base",
                       "--prompt", "hi"])
    assert str(refusal.value) == (
        f"the adapter in {adapter} adapts MoE experts (target_parameters ['experts.down_proj', "
        f"'experts.gate_up_proj']), and this model has none: it was trained on another base "
        f"({str(checkpoints('mixtral'))!r}); apply it to that one")


def read_samples(out_dir) -> dict[int, dict[str, str]]:
    by_step = {}
    for line in (out_dir / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], {})[record["prompt"]] = record["completion"]
    return by_step


def saved_model_samples(base, adapter_dir) -> dict[str, str]:
    """The reference: the saved adapter on a fresh nf4 base, unwrapped, sampled greedily."""
    model = load_model(base, quant="nf4", device=DEVICE, progress=False)
    peft_format.apply_adapter(model, adapter_dir)
    return dict(zip(PROMPTS, generate.sample(model, AutoTokenizer.from_pretrained(base), PROMPTS, SAMPLE_TOKENS)))


def test_training_samples_are_the_saved_adapters(checkpoints, tmp_path):
    """Samples written during training (FSDP, at each checkpoint and at the end) are the saved adapters' own greedy
    samples, and sampling mid-run leaves the training losses unchanged, bit for bit."""
    base = checkpoints("llama")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    flags = ["--batch_size", "4", "--sample_prompts", str(tmp_path / "prompts.txt"),
             "--sample_tokens", str(SAMPLE_TOKENS)]
    sampled = run_inprocess(common(base, tmp_path / "a", steps=4) + flags + ["--save_every", "2"])
    plain = run_inprocess(common(base, tmp_path / "b", steps=4) + flags)  # samples only after the last step
    assert losses(sampled) == losses(plain)
    samples = read_samples(tmp_path / "a")
    assert sorted(samples) == [2, 4] and all(list(s) == PROMPTS for s in samples.values())
    assert samples[2] == saved_model_samples(base, tmp_path / "a" / "checkpoint-2")
    assert samples[4] == saved_model_samples(base, tmp_path / "a")
    assert samples[2] != samples[4]  # the model changed in between, and the samples show it


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: gloo on CPU)")
def test_two_ranks_sample_the_saved_adapter(checkpoints, tmp_path):
    """Under torchrun with 2 ranks (a collective forward), rank 0 writes the saved adapter's greedy samples once."""
    base = checkpoints("llama")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run_torchrun(common(base, tmp_path / "out", steps=2) + ["--batch_size", "4", "--sample_prompts",
                 str(tmp_path / "prompts.txt"), "--sample_tokens", str(SAMPLE_TOKENS)], nproc=2)
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == len(PROMPTS)
    assert read_samples(tmp_path / "out") == {2: saved_model_samples(base, tmp_path / "out")}


def test_sample_prompts_flag(tmp_path):
    """'' gives built-in questions for the built-in dataset and none otherwise; a file gives its non-empty lines."""
    assert len(generate.load_prompts("", "builtin")) == 3 and generate.load_prompts("", "my.jsonl") == []
    (tmp_path / "p.txt").write_text("first\n\n  \nsecond\n")
    assert generate.load_prompts(str(tmp_path / "p.txt"), "builtin") == ["first", "second"]
    with pytest.raises(ValueError, match="no such file"):
        generate.load_prompts(str(tmp_path / "missing.txt"), "builtin")


def test_missing_sample_prompts_file_is_refused_before_anything_loads(checkpoints, tmp_path, monkeypatch):
    """--sample_prompts naming a missing file is refused before the data is tokenized or the model loaded (#27)."""
    with pytest.raises(ValueError) as e:
        refused_before_loading(monkeypatch, tmp_path, checkpoints("llama"), tokenizes=False,
                               args=("--sample_prompts", str(tmp_path / "missing.txt")))
    assert str(e.value) == (f"--sample_prompts {str(tmp_path / 'missing.txt')!r}: no such file (give a text file with "
                            "one prompt per line)")


def test_a_prompt_that_fills_the_context_is_refused_before_loading(checkpoints, tmp_path, monkeypatch):
    """A prompt that leaves no room for a new token in max_position_embeddings is refused in one line naming the
    flag, before the model loads: generate.py's --prompt, and train.py's --sample_prompts line (which failed with a
    traceback after training)."""
    path = checkpoints("llama")
    long = "hello " * 200  # of a context of 128 tokens
    width = len(generate.prompt_ids(long, AutoTokenizer.from_pretrained(path)))
    fills = f"a prompt of {width} tokens leaves no room for a new one in the model's context of 128 tokens " \
            "(max_position_embeddings): shorten it"
    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(cli.Refusal) as e:
        generate.main(["--model", str(path), "--prompt", "hi", "--prompt", long])
    assert str(e.value) == f"--prompt, prompt #2: {fills}"
    (tmp_path / "prompts.txt").write_text(f"hi\n{long}\n")
    with pytest.raises(cli.Refusal) as e:
        refused_before_loading(monkeypatch, tmp_path, path, tokenizes=True,
                               args=("--sample_prompts", str(tmp_path / "prompts.txt")))
    assert str(e.value) == f"--sample_prompts {tmp_path / 'prompts.txt'}, prompt #2: {fills}"


@pytest.mark.parametrize("flags, message", [
    (["--max_new_tokens", "-3"], "--max_new_tokens must be positive, got -3"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be positive, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
])
def test_generate_refuses_a_negative_length_or_temperature_before_loading(monkeypatch, flags, message):
    """generate.py refuses a length below 1 or a temperature below 0, naming the flag, before the model loads (#31)."""
    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(cli.Refusal) as e:
        generate.main(["--model", "tiny", "--prompt", "hello", *flags])
    assert str(e.value) == message


def test_train_refuses_a_sample_length_below_one():
    """train.py refuses --sample_tokens below 1, naming it (#31)."""
    with pytest.raises(ValueError) as e:
        train.parse_config(["--sample_tokens=-5"])
    assert str(e.value) == "--sample_tokens must be positive, got -5"


def test_sampling_stops_at_the_models_context(checkpoints, capsys):
    """New tokens stop where they and the longest prompt fill max_position_embeddings, and it says so; a prompt
    that fills the context alone is refused (#31)."""
    path = checkpoints("llama")
    model, tokenizer = reference_model(path), AutoTokenizer.from_pretrained(path)
    model.config.max_position_embeddings = 32  # of 128: fewer tokens to decode
    width = 1 + len(tokenizer.encode(PROMPTS[1], add_special_tokens=False))  # BOS + the prompt
    room = 32 - width
    capped = generate.sample(model, tokenizer, [PROMPTS[1]], max_new_tokens=300)
    assert capsys.readouterr().out == (f"sampling stops after {room} new tokens, not 300: the longest prompt's {width} "
                                       "tokens and the new ones fill the model's context of 32 tokens "
                                       "(max_position_embeddings)\n")
    assert capped == generate.sample(model, tokenizer, [PROMPTS[1]], max_new_tokens=room)
    assert capped != generate.sample(model, tokenizer, [PROMPTS[1]], max_new_tokens=room - 1)  # no EOS before
    assert capsys.readouterr().out == ""  # within the context: nothing to say
    with pytest.raises(ValueError) as e:
        generate.sample(model, tokenizer, ["hello " * 40])
    assert str(e.value).endswith(" tokens leaves no room for a new one in the model's context of 32 tokens "
                                 "(max_position_embeddings): shorten it")
