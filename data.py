"""Examples -> token ids with loss labels -> per-rank batches.

An example is a dict: alpaca-style {instruction, input?, output}, or {text} for plain language modelling.
Labels are the input ids with -100 (ignored by the loss) on the prompt and on padding, so the model is trained to
write responses, not to echo instructions. Labels are aligned with input_ids; the loss shifts them by one.
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

IGNORE = -100  # F.cross_entropy's ignore_index
BUILTIN_DATASET = "builtin"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class DataError(ValueError):
    """A dataset that cannot be used; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def builtin_examples(n: int = 2048, seed: int = 0) -> list[dict]:
    """A synthetic instruction set that a tiny random model learns within minutes: 48 short facts, asked many times.

    Each answer is fixed by its question, so the response loss can fall towards 0, and a falling curve shows the
    whole pipeline (loader, LoRA, FSDP, optimizer) works. The prompt is never trained on.
    """
    tasks = {
        "Translate into French.": dict(zip(
            "red blue green black white one two three four five cat dog house water bread moon".split(),
            "rouge bleu vert noir blanc un deux trois quatre cinq chat chien maison eau pain lune".split())),
        "Name the capital.": dict(zip(
            "France Italy Spain Japan Egypt Peru Kenya Canada Norway Chile Greece Poland Cuba Iran Mali Laos".split(),
            "Paris Rome Madrid Tokyo Cairo Lima Nairobi Ottawa Oslo Santiago Athens Warsaw Havana Tehran Bamako "
            "Vientiane".split())),
        "Give the opposite.": dict(zip(
            "hot big fast up old open light early full happy wet loud hard rich inside first".split(),
            "cold small slow down new closed dark late empty sad dry quiet soft poor outside last".split())),
    }
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        instruction = rng.choice(sorted(tasks))
        question = rng.choice(sorted(tasks[instruction]))
        examples.append({"instruction": instruction, "input": question, "output": tasks[instruction][question]})
    return examples


def load_examples(dataset: str, seed: int = 0) -> list[dict]:
    """`builtin`, or a local .jsonl file of {text} or {instruction, input?, output} records."""
    if dataset == BUILTIN_DATASET:
        return builtin_examples(seed=seed)
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise DataError(f"--dataset {dataset!r}: no such file (give a .jsonl file, or 'builtin')")
    if path.suffix != ".jsonl":
        raise DataError(f"--dataset {path.name}: unsupported extension {path.suffix!r}; use .jsonl")
    examples = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not valid JSON: {e}") from e
    if not examples:
        raise DataError(f"{path} holds no examples")
    for i, ex in enumerate(examples):
        if not ("text" in ex or ("instruction" in ex and "output" in ex)):
            raise DataError(f"{path}: record {i} has fields {sorted(ex)}; expected 'text', or 'instruction' and "
                            "'output' (with optional 'input')")
    return examples


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def render(example: dict) -> tuple[str, str]:
    """(prompt, response) text. Plain text is all response: every token is trained on."""
    if "text" in example:
        return "", example["text"]
    template = PROMPT_WITH_INPUT if example.get("input") else PROMPT_NO_INPUT
    return template.format(**example), example["output"]


def tokenize(example: dict, tokenizer, seq_len: int, train_on_prompt: bool = False) -> Tokenized:
    """BOS + prompt + response + EOS, at most `seq_len` tokens.

    Too long: the prompt loses tokens from its start first (its end, next to the response, matters most), then the
    response loses its end. So a long instruction never costs the example its response.
    """
    prompt, response = render(example)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    room_for_prompt = max(seq_len - len(response_ids), len(bos))
    if len(prompt_ids) > room_for_prompt:
        prompt_ids = bos + prompt_ids[len(prompt_ids) - room_for_prompt + len(bos):]
    response_ids = response_ids[: seq_len - len(prompt_ids)]
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE] * len(prompt_ids)
    return Tokenized(prompt_ids + response_ids, prompt_labels + response_ids)


def builtin_tokenizer():
    """The built-in model's tokenizer, made locally: BPE trained in a blink on the built-in examples.

    The task's words become single tokens, so a tiny model learns the task in minutes; any other text still
    encodes, as characters, and decodes back to itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Metaspace(prepend_scheme="never")])
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]  # printable ASCII, newline, Metaspace's space
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text for ex in builtin_examples() for text in render(ex)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def ensure_pad_token(tokenizer) -> None:
    """Many base models ship no pad token; padding is masked out of both attention and loss, so EOS serves."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------------------------------------------------------------------
# Batches


def collate(rows: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding is masked from attention and from the loss."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_loader(rows: list[Tokenized], batch_size: int, pad_id: int, rank: int, world_size: int,
                 seed: int) -> DataLoader:
    """Each rank sees a disjoint 1/world_size of the rows, reshuffled each epoch by sampler.set_epoch(epoch)."""
    sampler = DistributedSampler(rows, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Its own generator: iter(loader) draws a seed from it each epoch, which from the global one would shift the
    # RNG stream of LoRA dropout, and a resumed run could not restore it exactly.
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, drop_last=True, generator=torch.Generator(),
                      collate_fn=lambda batch: collate(batch, pad_id))
