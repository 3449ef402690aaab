"""A real small instruct model (SmolLM2-135M-Instruct, conftest.real_model) and real text (HumanEval's problems):
the outliers, vocabulary, special tokens and chat template that random weights lack."""
import json
import math

import pytest
import torch
from conftest import DEVICE, real_examples, reference_model, run_inprocess
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

import data
import generate
import merge
import quantization
import train
from model_loading import load_model

# An exact match on the CPU, where bitsandbytes' 4-bit layer is F.linear with the dequantized weight; CUDA's 4-bit
# kernels may round a few bf16 ulps differently.
EXACT = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=2e-2, atol=3e-2)
# SmolLM2's template opens a conversation without a system turn with its own default one
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def ours(real_model):
    """The real model as train.py loads it: NF4, double-quantized, bf16 storage."""
    return load_model(real_model, "nf4", DEVICE, progress=False).eval()


def test_the_real_model_is_smollm2_135m_instruct(real_model):
    """The cached folder holds SmolLM2-135M-Instruct as published: a 30-layer Llama of 134.5M parameters with tied
    embeddings, and a ChatML template that adds a system prompt and ends each turn with the EOS, <|im_end|>."""
    config = AutoConfig.from_pretrained(real_model)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == ("llama", 30, 576, 9, 3,
                                                                                         49152, True)
    assert not hasattr(config, "quantization_config")  # plain tensors, no longer GGUF's
    with safe_open(real_model / "model.safetensors", "pt") as f:
        assert sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_nf4_logits_equal_transformers_and_bitsandbytes_on_real_weights(real_model, ours):
    """On real weights, our NF4 model gives the logits of transformers' own 4-bit model (bitsandbytes NF4, double
    quantization, bf16 compute and storage) quantizing the same folder: the same packed bytes in every one of the 210
    decoder-layer linears, through the same kernels."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    reference = reference_model(real_model, quantization_config=config, device_map=str(DEVICE))
    theirs = {name: m for name, m in reference.named_modules() if quantization.is_4bit(m)}
    mine = {name: m for name, m in ours.named_modules() if quantization.is_4bit(m)}
    assert len(mine) == 30 * 7 and mine.keys() == theirs.keys()  # q k v o gate up down; embeddings stay bf16
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(mine[name].weight.data.view(torch.uint8), theirs[name].weight.data.view(torch.uint8))
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    ids = tokenizer(real_examples()[0]["prompt"], return_tensors="pt").input_ids.to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, **EXACT)


def held_out_loss(model, rows, pad_id: int) -> float:
    """Mean loss over every label token of `rows`, as train.evaluate counts it, by transformers' own loss."""
    total = count = 0
    with torch.no_grad():
        for batch in data.eval_batches(rows, 8, pad_id, rank=0, world=1):
            n = train.n_targets(batch).item()
            total += model(**train.model_inputs(batch, DEVICE)).loss.item() * n
            count += n
    return total / count


def test_lora_on_real_text_lowers_the_loss_on_held_out_problems(real_model, ours, tmp_path):
    """Four LoRA steps on HumanEval's problems (signature and docstring -> the function's body) lower the loss on the
    9 problems held out of training (--eval_fraction 0.05) by a tenth: from the base model's loss on them to
    train.py's final eval loss."""
    dataset = tmp_path / "humaneval.jsonl"
    dataset.write_text("".join(json.dumps(example) + "\n" for example in real_examples()))
    # --lr 2e-3, ten times the usual QLoRA rate: four steps are all this test can afford
    args = ["--model", str(real_model), "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"),
            "--eval_fraction", "0.05", "--seq_len", "128", "--batch_size", "4", "--max_steps", "4", "--lr", "2e-3",
            "--warmup_steps", "0", "--lora_rank", "8", "--lora_alpha", "16", "--grad_checkpointing", "none"]
    cfg = train.parse_config(args)
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    _, held_out = data.prepare(cfg, tokenizer, log=lambda *_: None)
    assert len(held_out) == 9
    before = held_out_loss(ours, held_out, tokenizer.pad_token_id)  # LoRA starts at B = 0: the base model
    after = run_inprocess(args)[-1]["eval_loss"]
    # A real model: chance is ln(49152) = 10.8. On the CPU 1.610 here (train.evaluate at LoRA's init: 1.608), then 1.390
    assert 1.5 < before < 1.7
    assert after < 0.9 * before, (before, after)


# ---------------------------------------------------------------------------------------------------------------------
# Its chat format, end to end: training rows, the saved tokenizer, merge and generate.py


def rows_of(records: list[dict], dataset, tokenizer, **settings) -> list[dict]:
    """The training rows train.py tokenizes from `records`, written to the .jsonl file `dataset`, with the data
    settings `settings`."""
    dataset.write_text("".join(json.dumps(record) + "\n" for record in records))
    rows, _ = data.prepare(data.DataConfig(dataset=str(dataset), **settings), tokenizer, log=lambda *_: None)
    return list(rows)


def test_no_row_holds_a_bos_the_template_did_not_write(real_model, tmp_path):
    """SmolLM2's BOS is ChatML's turn opener, <|im_start|>: a chat row holds it only where the template opens a turn,
    and an alpaca-format row and a text row begin with their own text, as the model's tokenizer encodes them."""
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer("Hi").input_ids == tokenizer.encode("Hi") == [26843]

    def ids(kind: str, record: dict, **settings) -> list[int]:  # a fresh tokenizer, as each run loads its own
        [row] = rows_of([record], tmp_path / f"{kind}.jsonl", AutoTokenizer.from_pretrained(real_model), seq_len=96,
                        **settings)
        return row["input_ids"]

    messages = [{"role": "user", "content": "Name the capital of Peru."}, {"role": "assistant", "content": "Lima"}]
    chat = ids("chat", {"messages": messages})
    assert chat == tokenizer.apply_chat_template(messages).input_ids
    assert chat.count(tokenizer.bos_token_id) == 3  # system, user, assistant
    alpaca = ids("alpaca", {"instruction": "Name the capital.", "input": "Peru", "output": "Lima"},
                 prompt_format="alpaca")
    assert tokenizer.decode(alpaca) == ("### Instruction:\nName the capital.\n\n### Input:\nPeru\n\n### Response:\n"
                                        "Lima<|im_end|>")
    text = "The capital of Peru is Lima."
    assert ids("text", {"text": text}) == tokenizer.encode(text) + [tokenizer.eos_token_id]


def conversation(kind: str, country: str, city: str = "") -> list[dict]:
    """The question for `country`'s capital as a `kind` row holds it (an alpaca row's user turn: the instruction, a
    blank line, the input), and the answer when `city` is given: a sentence opening with a word, so that the tokenizer
    splits no token across the turn's boundary."""
    question = {"chat": f"What is the capital of {country}?",
                "alpaca": f"Name the capital of this country.\n\n{country}"}
    answer = [{"role": "assistant", "content": f"The capital of {country} is {city}."}] if city else []
    return [{"role": "user", "content": question[kind]}] + answer


def record(kind: str, country: str, city: str) -> dict:
    """A dataset line of `kind` holding conversation(kind, country, city)."""
    messages = conversation(kind, country, city)
    if kind == "chat":
        return {"messages": messages}
    return {"instruction": "Name the capital of this country.", "input": country, "output": messages[1]["content"]}


CAPITALS = [("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Mali", "Bamako")]


@pytest.fixture(scope="module")
def chat_runs(real_model, tmp_path_factory) -> dict[str, tuple]:
    """rows kind -> (run folder, merged folder, training rows): a LoRA step of train.py on 4 chat rows and one on 4
    alpaca rows (auto: the chat format, SmolLM2 having a template), sampling the France question when it saves
    the adapter, each run merged by merge.py."""
    runs = {}
    for kind in ("chat", "alpaca"):
        folder = tmp_path_factory.mktemp(kind)
        records = [record(kind, country, city) for country, city in CAPITALS]
        rows = rows_of(records, folder / "rows.jsonl", AutoTokenizer.from_pretrained(real_model), seq_len=64)
        (folder / "prompts.txt").write_text(json.dumps({"messages": conversation(kind, "France")}) + "\n")
        run_inprocess(["--model", str(real_model), "--dataset", str(folder / "rows.jsonl"), "--output_dir",
                       str(folder / "run"), "--seq_len", "64", "--batch_size", "4", "--max_steps", "1", "--lr", "1e-3",
                       "--warmup_steps", "0", "--lora_rank", "8", "--lora_alpha", "16", "--grad_checkpointing", "none",
                       "--sample_prompts", str(folder / "prompts.txt"), "--sample_tokens", "12"])
        merge.merge(str(real_model), folder / "run", folder / "merged", verify=False, progress=False)
        runs[kind] = folder / "run", folder / "merged", rows
    return runs


def test_the_saved_tokenizer_renders_the_training_rows(chat_runs):
    """apply_chat_template on the tokenizer saved in the final adapter folder and in the merged folder gives exactly
    the ids training rendered, for a chat row and an alpaca row: SmolLM2's template, its default system turn first."""
    for kind, (run, merged, rows) in chat_runs.items():
        messages = conversation(kind, *CAPITALS[0])
        for folder in (run, merged):
            saved = AutoTokenizer.from_pretrained(folder)
            assert saved.apply_chat_template(messages).input_ids == rows[0]["input_ids"], (kind, folder)
            assert saved.decode(rows[0]["input_ids"]).startswith(DEFAULT_SYSTEM + "<|im_start|>user\n")


def test_chat_format_end_to_end(chat_runs):
    """A {"messages"} prompt is rendered as training rendered the same conversation (the row's ids before the
    assistant's first), and the merged folder completes it as the model as trained (base + adapter, sampling when it
    saved the adapter) did, merge.py's default semantics merging into the 4-bit base the adapter trained on; the
    completion ends where the greedy model picks <|im_end|>."""
    for kind, (run, merged, rows) in chat_runs.items():
        first_target = next(i for i, label in enumerate(rows[0]["labels"]) if label != data.IGNORE)
        prompt = json.dumps({"messages": conversation(kind, CAPITALS[0][0])})
        assert generate.prompt_ids(prompt, AutoTokenizer.from_pretrained(run)) == rows[0]["input_ids"][:first_target]

        model, tokenizer = generate.load(str(merged), None, None, DEVICE)
        prompt = json.dumps({"messages": conversation(kind, "France")})
        [completion] = generate.sample(model, tokenizer, [prompt], max_new_tokens=12)
        [as_trained] = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        assert as_trained["step"] == 1 and completion == as_trained["completion"] == "The capital of France is Paris."
        ids = generate.prompt_ids(prompt, tokenizer) + tokenizer.encode(completion)
        with torch.no_grad():
            next_id = model(torch.tensor([ids], device=DEVICE)).logits[0, -1].argmax().item()
        assert tokenizer.convert_ids_to_tokens(next_id) == "<|im_end|>", kind
