"""Sample from a model: the one being trained (FSDP-wrapped or not), a base + adapter as trained, or a merged folder.

    python generate.py --model tiny --adapter out --prompt '{"instruction": "Name the capital.", "input": "Peru"}'
    python generate.py --model merged --prompt '{"messages": [{"role": "user", "content": "Capital of Peru?"}]}'
    python generate.py --model merged --prompt "Once upon a time" --temperature 0.8 --seed 1

A prompt is rendered as training renders rows (prompt_ids): a JSON {"messages": [...]} through the chat template, with
the generation prompt; a JSON record shaped like alpaca data, {"instruction": ..., "input": ... (optional)}, or like
prompt_completion data, {"prompt": ...}, as the run rendered such rows, in its recorded --prompt_format and
--system_prompt (train_config.json); anything else is completed as it is. An adapter's run folder holds the tokenizer
it trained with, chat template included, and so does a merged folder. Decoding stops at EOS and at the chat
template's end of turn (a token, or its text where that is several tokens: ChatML on a base model's tokenizer); it is
greedy at temperature 0, else sampling from softmax(logits / temperature); prompts are left-padded into one batch and
decoded with a KV cache.
"""
import argparse
import inspect
import json
import math
import sys
from pathlib import Path

import cli
import settings


def flags() -> argparse.ArgumentParser:
    """generate.py's command line; parse_args adds the defaults, written once in sample()."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base (with --adapter) or merged model: folder, Hub id, tiny")
    parser.add_argument("--adapter", default=None, help="a training output_dir (or its checkpoint-N)")
    parser.add_argument("--prompt", action="append", required=True,
                        help='plain text, a JSON instruction record, or {"messages": [...]}; repeat for several')
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0: greedy")
    parser.add_argument("--seed", type=int, help="for temperature > 0")
    parser.add_argument("--quant", default=None, choices=settings.QUANT_TYPES,
                        help="base quantization (default: the adapter's, as trained; without an adapter, a "
                             "pre-quantized checkpoint's own, else none)")
    parser.add_argument("--allow_other_base", action="store_true",
                        help="apply --adapter to another base than the one it was trained on, on purpose")
    parser.add_argument("--chat_template", default="", help="'chatml', a Jinja template, or a file holding one: for "
                                                            "a model whose tokenizer has none, as train.py takes it")
    return parser


if __name__ == "__main__":  # --help, and a flag argparse refuses, are answered before the libraries below load
    cli.check_flags(flags())

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import builtin  # noqa: E402
import data  # noqa: E402
import fused  # noqa: E402
import model_loading  # noqa: E402
import peft_format  # noqa: E402
import quantization  # noqa: E402
import run_folder  # noqa: E402


def prompt_ids(prompt: str, tokenizer, prompt_format: str = "auto", system_prompt: str = "") -> list[int]:
    """The token ids a prompt is completed from: a {"messages": [...]} record through the chat template with the
    generation prompt; an {"instruction", "input"?} record, or a {"prompt"} one, as data.tokenize renders the prompt
    of an alpaca row, or of a prompt_completion row, in `prompt_format` (auto: chat where the tokenizer has a
    template) after `system_prompt`; other text as a text row starts, BOS and the text."""
    record = _record(prompt)
    row = "alpaca" if "instruction" in record else "prompt_completion" if "prompt" in record else None
    if "messages" in record:
        data.check_chat_template(tokenizer, 'a {"messages": [...]} prompt is rendered by a chat template')
        text = tokenizer.apply_chat_template(data.conversation(record, "chat", "chat"), tokenize=False,
                                             add_generation_prompt=True)
    elif row and "text" not in record:
        fmt = data.resolve_prompt_format(prompt_format, tokenizer)
        answer = {"output": ""} if row == "alpaca" else {"completion": ""}
        messages = data.conversation({**record, **answer}, row, fmt, system_prompt)[:-1]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=data.row_template(row, fmt, tokenizer))
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer.encode(prompt, add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=False)  # the template wrote BOS where it wants one


def _record(prompt: str) -> dict:
    """The prompt as a JSON object, or {} for text that is not one."""
    if not prompt.lstrip().startswith("{"):
        return {}
    try:
        record = json.loads(prompt)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def load_prompts(path: str, dataset: str) -> list[str]:
    """train.py's --sample_prompts: a text file with one prompt per line (plain text or a JSON record); '' gives one
    question per task of the built-in dataset when training on it, and no prompts otherwise."""
    if not path:
        if dataset != data.BUILTIN_DATASET:
            return []
        first = {}
        for ex in data.builtin_examples():
            first.setdefault(ex["instruction"], ex)
        return [json.dumps({"instruction": ex["instruction"], "input": ex["input"]}) for ex in first.values()]
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--sample_prompts {path!r}: no such file (give a text file with one prompt per line)")
    prompts = [line for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--sample_prompts {file} holds no prompts")
    return prompts


def context_length(model: torch.nn.Module) -> int | None:
    """max_position_embeddings of the transformers model in `model`, which FSDP and the loss module may wrap."""
    configs = (getattr(m, "config", None) for m in model.modules())
    return next((c.max_position_embeddings for c in configs if hasattr(c, "max_position_embeddings")), None)


def refuse_prompts_that_fill(ids: list[list[int]], config, named: str) -> None:
    """Prompts (as prompt_ids renders them) checked against the model's `config` before it loads: one that fills its
    context alone leaves no room for a new token, and is refused by its number in `named` (a flag, or a file)."""
    limit = getattr(config, "max_position_embeddings", None)
    for number, prompt in enumerate(ids, 1):
        if limit is not None and len(prompt) >= limit:
            raise cli.Refusal(f"{named}, prompt #{number}: {_fills(len(prompt), limit)}")


def _fills(width: int, limit: int) -> str:
    return (f"a prompt of {width} tokens leaves no room for a new one in the model's context of {limit} tokens "
            "(max_position_embeddings): shorten it")


def new_tokens_that_fit(model: torch.nn.Module, width: int, max_new_tokens: int) -> int:
    """max_new_tokens, or fewer where prompts of `width` tokens and they would pass the model's context (said on rank
    0); a prompt that fills the context alone is refused (the commands check first: refuse_prompts_that_fill)."""
    limit = context_length(model)
    if limit is None or width + max_new_tokens <= limit:
        return max_new_tokens
    if width >= limit:
        raise cli.Refusal(_fills(width, limit))
    context = f"the model's context of {limit} tokens (max_position_embeddings)"
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(f"sampling stops after {limit - width} new tokens, not {max_new_tokens}: the longest prompt's "
                   f"{width} tokens and the new ones fill {context}")
    return limit - width


def stop_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokenizer's EOS, the model's own (Llama 3 lists several in generation_config), and the chat template's
    end-of-turn token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # FSDP forwards the attribute
    return ({tokenizer.eos_token_id, end_of_turn(tokenizer)} | set(eos if isinstance(eos, list) else [eos])) - {None}


def end_of_turn(tokenizer) -> int | None:
    """The special token the chat template closes an assistant's turn with (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>), or None: the first token it writes after the turn's content, where that is a special token."""
    after = tokenizer.encode(_after_turn(tokenizer), add_special_tokens=False)
    token = tokenizer.added_tokens_decoder.get(after[0]) if after else None
    return after[0] if token is not None and token.special else None


def end_of_turn_text(tokenizer) -> str:
    """The text the chat template closes an assistant's turn with where that is no special token, or '': ChatML's
    '<|im_end|>' is several tokens on a tokenizer without ChatML's tokens (--chat_template chatml on a base model),
    and the model learns to write those."""
    return "" if end_of_turn(tokenizer) is not None else _after_turn(tokenizer).strip().split("\n")[0]


def _after_turn(tokenizer) -> str:
    """What the chat template writes after an assistant's message ('' without a template)."""
    if not tokenizer.chat_template:
        return ""
    turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    return text[text.rindex("!") + 1:]


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
           seed: int = 0, device: torch.device | None = None, prompt_format: str = "auto",
           system_prompt: str = "") -> list[str]:
    """The completion of each prompt (rendered by prompt_ids in `prompt_format` after `system_prompt`), up to its
    first stop token (stop_ids) or end-of-turn text (end_of_turn_text). Greedy at temperature 0; otherwise drawn with
    a generator seeded by `seed`, so the same call gives the same text.

    Under FSDP the forward is a collective: every rank must call this with the same prompts. Rank 0's choice of each
    token is broadcast, so that the ranks can never disagree on what to feed next or when to stop.
    """
    if not prompts:
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids = [prompt_ids(p, tokenizer, prompt_format, system_prompt) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(x) for x in ids)
    max_new_tokens = new_tokens_that_fit(model, width, max_new_tokens)
    was_training = model.training
    model.eval()  # no dropout
    # Left padding: every prompt ends in the last column, so one forward predicts the next token of all of them.
    # Padding is masked out, and positions count real tokens only: each row computes what it would alone.
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(stop_ids(model, tokenizer)), device=device)
    stop_text = end_of_turn_text(tokenizer)
    generator = torch.Generator(device).manual_seed(seed)
    new = torch.empty(len(ids), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=device)
    cache, prompt = None, (input_ids, mask)
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()  # (batch, vocab); transformers 5.24 names it cache
        if not logits.isfinite().all():  # argmax would pick a token all the same
            raise ValueError(nonfinite(model, *prompt, new))
        if temperature > 0:
            next_ids = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(-1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(next_ids, src=0)
        next_ids = torch.where(done, pad, next_ids)  # finished rows only wait for the others
        new = torch.cat([new, next_ids[:, None]], dim=1)
        done |= torch.isin(next_ids, stop)
        if stop_text:  # the same on every rank: each holds the same `new`
            done |= torch.tensor([stop_text in tokenizer.decode(row) for row in new.tolist()], device=device)
        if done.all():
            break
        # Only the new token goes in next; the cache holds the rest.
        input_ids, positions = next_ids[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    model.train(was_training)
    completions, stops = [], set(stop.tolist())
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))  # cut at the first stop token
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        completions.append(text.partition(stop_text)[0] if stop_text else text)  # cut at the end of the turn
    return completions


def nonfinite(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, new: torch.Tensor) -> str:
    """fused.nonfinite_logits on the prompts and the tokens drawn so far, run again without the cache."""
    ids, mask = torch.cat([input_ids, new], dim=1), torch.cat([mask, torch.ones_like(new)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return fused.nonfinite_logits(model, lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions))


def log_samples(model: torch.nn.Module, tokenizer, prompts: list[str], out_file: Path, step: int,
                device: torch.device, max_new_tokens: int, prompt_format: str, system_prompt: str) -> list[dict]:
    """Greedy samples from the model in training, its prompts rendered in the run's format as generate.py renders them
    from its run folder: every rank samples (FSDP), rank 0 prints and appends to out_file. Returns the records written
    (on rank 0; none elsewhere)."""
    if not prompts:
        return []
    completions = sample(model, tokenizer, prompts, max_new_tokens, device=device, prompt_format=prompt_format,
                         system_prompt=system_prompt)
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    records = [{"step": step, "prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    with Path(out_file).open("a") as f:
        for record in records:
            tqdm.write(f"sample at step {step}: {record['prompt']} -> {record['completion']!r}")
            f.write(json.dumps(record) + "\n")
    return records


def load_tokenizer(model: str, adapter: str | None, chat_template: str = "") -> tuple[object, dict]:
    """The tokenizer the adapter's run saved (with the chat template it rendered with), else the model's, with
    --chat_template's template set on it; and the recorded prompt format, {prompt_format, system_prompt}, of the run
    folder or merged folder (train_config.json; none for other models)."""
    model_dir = builtin.model_dir(model)
    folder = Path(adapter) if adapter else model_dir
    saved = (folder / "tokenizer_config.json").is_file()  # not in run folders written before it was saved there
    tokenizer = model_loading.load_tokenizer(folder if saved else model_dir)
    if chat_template:
        tokenizer.chat_template = data.read_chat_template(chat_template)
    run = run_folder.read_run_config(folder)
    return tokenizer, {key: run[key] for key in ("prompt_format", "system_prompt") if key in run}


def load(model: str, adapter: str | None, quant: str | None, device: torch.device,
         allow_other_base: bool = False, chat_template: str = "") -> tuple[torch.nn.Module, object]:
    """Model and tokenizer (load_tokenizer): a base with its adapter as trained (4-bit by default), or a merged /
    plain model. An adapter trained on another base is refused unless `allow_other_base` (run_folder.check_base)."""
    model_dir = builtin.model_dir(model)
    tokenizer, _ = load_tokenizer(model, adapter, chat_template)  # a folder without one fails before the model loads
    if adapter:  # a missing adapter, or one for another base, fails before the model loads
        peft_format.read_adapter_config(Path(adapter))
        run_folder.check_base(Path(adapter), model, model_dir, allow_other_base)
    if quant is None:  # as trained with an adapter; a merged or plain model as it is stored (16 or 4 bits)
        quant = run_folder.trained_quant(Path(adapter), model_dir) if adapter else model_loading.resolve_quant(
            model_loading.read_config(model_dir), quantization.AUTO, default="none")
    net = model_loading.load_model(model_dir, quant, device).eval()
    if adapter:
        peft_format.apply_adapter(net, Path(adapter))
    return net, tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with sample()'s defaults; a length or temperature that sampling cannot take is refused here."""
    parser = flags()
    parser.set_defaults(**{k: p.default for k, p in inspect.signature(sample).parameters.items()
                           if k in ("max_new_tokens", "temperature", "seed")})
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise cli.Refusal(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:  # NaN fails this too
        raise cli.Refusal(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    return args


def run(args: argparse.Namespace) -> list[str]:
    """Load, sample every prompt, print each as rendered with its completion; the completions."""
    tokenizer, recorded = load_tokenizer(args.model, args.adapter, args.chat_template)
    ids = [prompt_ids(p, tokenizer, **recorded) for p in args.prompt]  # before the model loads
    refuse_prompts_that_fill(ids, model_loading.read_config(builtin.model_dir(args.model)), "--prompt")
    rendered = [tokenizer.decode(x) for x in ids]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(args.model, args.adapter, args.quant, device, args.allow_other_base, args.chat_template)
    completions = sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed, device,
                         **recorded)
    for prompt, completion in zip(rendered, completions):
        print(f"### prompt\n{prompt}\n### completion\n{completion}\n")
    return completions


def main(argv: list[str] | None = None) -> list[str]:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli.main(parse_args, run))
