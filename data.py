"""Datasets -> token ids with loss labels -> per-rank batches: padded, grouped by length, or packed.

    python train.py --model M --dataset D --show 3    # rendered rows with the trained-on spans marked, and stats

Each example becomes a list of text segments, each trained on or not: the prompt is not, the response is. Labels are
the input ids with -100 (ignored by the loss) on untrained tokens and on padding; the loss shifts them by one.
Formats (--dataset_format, `auto` picks by column names):
    alpaca             instruction, input (optional), output
    chat               messages: [{role, content}, ...] rendered by the tokenizer's chat template; assistant turns
                       trained
    prompt_completion  prompt, completion
    text               text, every token trained; a document longer than seq_len becomes several rows
Every row but text is a conversation rendered by a chat template (conversation, row_template). --prompt_format decides,
once per run, which one renders alpaca and prompt_completion rows: chat, the tokenizer's own (the instruction and
input, or the prompt, as the user's turn, the output as the assistant's), as TRL, torchtune and Axolotl render them
for an instruct model; or alpaca, our ALPACA template (prompt_completion rows: PLAIN, prompt then completion). auto
takes chat where the tokenizer has a template. The template that rendered the training rows is left on the
tokenizer, which every run folder saves: apply_chat_template on it renders what training rendered.
"""
import bisect
import bz2
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import random
import statistics
import threading
import time
from pathlib import Path

import jinja2
import numpy
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

import cli
from settings import BUILTIN_DATASET, DataConfig

IGNORE = -100  # F.cross_entropy's ignore_index
COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "prompt_completion": ("prompt", "completion"),
           "text": ("text",)}  # required columns, in the order `auto` tries them
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # which datasets also opens by suffix
# --chat_template chatml: for tokenizers that ship no template (base models). The ChatML layout of Qwen and others.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# --prompt_format alpaca, as chat templates. Saved as the tokenizer's template rather than recorded as a name: any
# server's chat API (vLLM's) and apply_chat_template then render the prompt the adapter was trained on, not only
# generate.py. An alpaca row's input travels inside the user's turn, under its own heading (conversation).
ALPACA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
          "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n### Response:\n' }}"
          "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
PLAIN = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
         "{% elif m['role'] == 'user' %}{{ m['content'] }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
         "{% endfor %}")  # prompt_completion rows: the prompt, then the completion
ALPACA_INPUT = "\n\n### Input:\n"  # between an alpaca row's instruction and input, in the alpaca format
TEMPLATE_FIX = "pass --chat_template chatml (or a Jinja template, or a file holding one)"


class DataError(cli.Refusal):
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


def load_raw(dataset: str, config_name: str | None = None, split: str = "train", log=print):
    """`builtin`, a local file or folder of .jsonl/.json/.parquet/.csv/.txt files (any case, or compressed), or a Hub
    dataset id. A folder's other entries, and its hidden ones (an editor's swap file, .git/), are named as skipped."""
    import datasets

    if dataset == BUILTIN_DATASET:
        return datasets.Dataset.from_list(builtin_examples())
    path = Path(dataset).expanduser()
    if path.exists():
        files = [path]
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and file_type(p) and not p.name.startswith("."))
            _log_skipped(path, files, log)
        types = {file_type(p) or p.suffix for p in files}
        if not files or len({FILE_BUILDERS.get(t) for t in types}) != 1 or not types <= FILE_BUILDERS.keys():
            raise DataError(f"--dataset {path}: need one file type among {sorted(FILE_BUILDERS)}, found "
                            f"{sorted(types) or 'none'}")
        builder = FILE_BUILDERS[file_type(files[0])]
        # pyarrow reads bytes that are not UTF-8 into strings that fail only when used, naming no file: check first
        if not any([check_lines(p, as_json=False) for p in files]):  # every file checked, not only up to one with rows
            raise DataError(f"{path} holds no rows: {'every file in it is' if path.is_dir() else 'the file is'} empty")
        return _load_files(builder, files, path, log)
    if dataset.count("/") != 1 or dataset.startswith((".", "/", "~")):
        raise DataError(f"--dataset {dataset!r}: no such file or folder, and not a Hub dataset id 'org/name'")
    try:
        return datasets.load_dataset(dataset, config_name or None, split=split)
    except Exception as e:
        raise DataError(f"cannot load Hub dataset {dataset!r} (config {config_name}, split {split!r}): {e}. "
                        "Offline? Point --dataset at local files instead.") from e


def file_type(file: Path) -> str:
    """A data file's type as FILE_BUILDERS names it, whatever its case and compression ('.jsonl' for b.JSONL and
    x.jsonl.gz); '' for a file that is none of them."""
    name = file.name.lower()
    compression = Path(name).suffix
    kind = Path(name.removesuffix(compression) if compression in COMPRESSIONS else name).suffix
    # parquet compresses inside the file, and datasets reads no .parquet.gz
    return kind if kind in FILE_BUILDERS and not (kind == ".parquet" and compression in COMPRESSIONS) else ""


def _log_skipped(folder: Path, files: list[Path], log) -> None:
    """Names the entries of `folder` that are not among `files`, with why: hidden, or not a data file."""
    others = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir() if p not in files)
    hidden = [name for name in others if name.startswith(".")]
    not_data = [name for name in others if name not in hidden]
    reasons = []
    if not_data:
        reasons.append(f"{', '.join(not_data)} (not a data file: {' '.join(FILE_BUILDERS)}, or compressed "
                       f"{' '.join(COMPRESSIONS)})")
    if hidden:
        reasons.append(f"{', '.join(hidden)} (hidden: the name starts with '.')")
    if reasons:
        log(f"{folder}: skipped {'; '.join(reasons)}")


def _open(file: Path):
    """The file's bytes, decompressed."""
    return COMPRESSIONS.get(file.suffix.lower(), open)(file, "rb")


def _csv_rows(f):
    """The rows of an open CSV file, as lists of cells; utf-8-sig: pandas drops the byte-order mark of a
    spreadsheet's export too."""
    return csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))


def _load_files(builder: str, files: list[Path], path: Path, log):
    import datasets

    options = {}
    if builder == "csv":  # as text: pandas reads an integer column with an empty cell as floats ('2.0'), 'NA' as empty
        columns = {}
        for p in files:
            with _open(p) as f:
                columns |= dict.fromkeys(next(filter(None, _csv_rows(f)), []))  # pandas skips blank lines
        options = dict(features=datasets.Features({c: datasets.Value("string") for c in columns}),
                       keep_default_na=False)
    ds = _read(builder, files, path, **options)
    if (column := _records_list(ds, files, path)) is not None:  # {"data": [{...}, ...]}: each file one object
        log(f"{path}: read the list {column!r} of each file")
        ds = _read(builder, files, path, field=column)
    return ds


def _read(builder: str, files: list[Path], path: Path, **options):
    """The files as one dataset; where datasets fails, a DataError naming the file (and line, or columns) at fault."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    except Exception as e:  # datasets wraps parse errors in several types, naming neither file nor line
        for p in (p for p in files if file_type(p) == ".jsonl"):
            check_lines(p, as_json=True)  # raises at the first line that does not parse, if one does
        if len(files) > 1:
            _check_each_file(builder, files, path, options.get("field"))
        raise DataError(f"cannot read {path} as {builder}: {e}") from e


def _check_each_file(builder: str, files: list[Path], path: Path, field: str | None) -> None:
    """A DataError naming the file at fault, where datasets read the files as one table and its error (a failed
    cast, a schema or a field not found) names none: the first file it cannot read alone, or the first whose
    columns differ from the first file's."""
    import datasets

    def columns(file: Path) -> list[str]:  # from the first rows, as datasets reads them
        try:
            rows = datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True,
                                         **({"field": field} if field else {}))
            return list(next(iter(rows), {}))
        except Exception as e:
            raise DataError(f"cannot read {file} as {builder}: {e}") from e

    first, *others = [p for p in files if check_lines(p, as_json=False)]  # an empty file adds no rows nor columns
    ours = columns(first)
    for p in others:
        if set(theirs := columns(p)) != set(ours):
            raise DataError(f"cannot read {path} as one table: {first.name} has the columns {ours} and {p.name} "
                            f"{theirs}; give every file the same columns, or move one out")


def _records_list(ds, files: list[Path], path: Path) -> str | None:
    """The column that holds a list of records, where each .json file was one object with exactly one such list; a
    one-row chat dataset (a list of messages) stays as it is, and an object holding several lists is refused."""
    import datasets

    if len(ds) != len(files) or any(file_type(p) != ".json" for p in files):
        return None
    lists = [c for c, f in ds.features.items() if isinstance(f, datasets.List) and isinstance(f.feature, dict)]
    if not lists or "messages" in lists:
        return None
    if len(lists) > 1:
        raise DataError(f"{path}: an object holding the lists {lists}; a .json file holds a list of records, or an "
                        "object holding one list of records: keep one of them")
    return lists[0]


def check_lines(file: Path, as_json: bool) -> bool:
    """Whether a data file holds anything but blank lines; a DataError naming file:line for the first line that is
    not UTF-8, for a CSV row with more fields than its header, or (as_json) for a line that is not one JSON object.
    Parquet is binary: only its size tells."""
    if file_type(file) == ".parquet":
        return file.stat().st_size > 0
    rows, offset = 0, 0
    with _open(file) as f:
        for n, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}:{n}: the byte at offset {offset + e.start} (0x{line[e.start]:02x}) is not "
                                "UTF-8; re-encode the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)") from None
            offset += len(line)
            if not text.strip():
                continue
            rows += 1
            if as_json:  # without its newline, an unclosed object is reported at the end of its own line
                try:
                    record = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line of a "
                                    ".jsonl file is one JSON object") from None
                if not isinstance(record, dict):
                    raise DataError(f"{file}:{n}: a line of a .jsonl file must be one JSON object {{...}}")
    if file_type(file) == ".csv":
        _check_fields(file)
    return rows > 0


def _check_fields(file: Path) -> None:
    """A DataError naming the first CSV row with more fields than the header. pandas refuses such a row with its own
    count of lines, naming no file, or, where every row has one more, reads the first field as an index and the
    others one column to the left."""
    with _open(file) as f:
        rows = _csv_rows(f)
        header = next(filter(None, rows), [])  # as pandas, which skips blank lines
        start = rows.line_num + 1  # a quoted cell may span lines: name the row's first
        for row in rows:
            if len(row) > len(header):
                raise DataError(f"{file}:{start}: {len(row)} fields, where the header names {len(header)} "
                                f"({', '.join(header)}); quote a cell that holds a comma (\"a, b\"), or add its column "
                                "to the header")
            start = rows.line_num + 1


def apply_field_map(ds, field_map: str):
    """`--field_map instruction=question,output=answer`: our field name = the dataset's column name. The pairs apply
    at once, so two columns can swap names."""
    mapping = {}  # theirs -> ours
    for pair in filter(None, (p.strip() for p in field_map.split(","))):
        ours, _, theirs = pair.partition("=")
        if not ours or not theirs:
            raise DataError(f"--field_map {pair}: not ours=theirs (e.g. instruction=question)")
        if theirs not in ds.column_names:
            raise DataError(f"--field_map {pair}: no column {theirs!r}; the columns are {ds.column_names}")
        if theirs in mapping or ours in mapping.values():
            raise DataError(f"--field_map {pair}: {theirs!r} or {ours!r} is mapped twice; map each column once")
        mapping[theirs] = ours
    for theirs, ours in mapping.items():
        if ours in ds.column_names and ours not in mapping:  # arrow would hold two columns of one name
            raise DataError(f"--field_map {ours}={theirs}: the dataset already has a column {ours!r}; map it too (a "
                            f"swap: '{ours}={theirs},{theirs}={ours}')")
    return ds.rename_columns(mapping)


def detect_format(columns: list[str], fmt: str = "auto") -> str:
    if fmt == "auto":
        found = [f for f, need in COLUMNS.items() if all(c in columns for c in need)]
        if not found:
            raise DataError(f"cannot tell the format from the columns {columns}: expected one of "
                            f"{ {f: list(c) for f, c in COLUMNS.items()} }; rename with --field_map ours=theirs")
        return found[0]
    missing = [c for c in COLUMNS[fmt] if c not in columns]
    if missing:
        raise DataError(f"--dataset_format {fmt} needs columns {missing}; the columns are {columns} "
                        "(rename with --field_map ours=theirs)")
    return fmt


def check_text_columns(ds, fmt: str, source: str) -> None:
    """The columns a format renders as text hold text (or numbers): a struct or a list would be trained as its
    Python repr. Chat's messages are checked row by row (segments)."""
    import datasets

    for name in (*COLUMNS[fmt], "input") if fmt != "chat" else ():
        feature = ds.features.get(name)
        if feature is not None and not isinstance(feature, datasets.Value):
            kind = "a struct" if isinstance(feature, dict) else "a list" if isinstance(
                feature, (datasets.List, datasets.LargeList)) else type(feature).__name__
            first = f" ({ds[0][name]!r:.60})" if len(ds) else ""
            raise DataError(f"{source}: column {name!r} holds {kind}, not text{first}; make it a string, or map a "
                            f"text column onto it with --field_map {name}=COLUMN")


# ----------------------------------------------------------------------------------------------------------------------
# The prompt format: which chat template renders the rows, decided once


def read_chat_template(value: str) -> str | None:
    """--chat_template's template: ChatML for 'chatml', the value itself where it is a Jinja template, else the text of
    the file it names (None for ''). A name that is neither is refused: used as the template, every row would render
    as that name."""
    if not value:
        return None
    if value == "chatml":
        return CHATML
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"--chat_template {value}: no such file, and not a Jinja template; pass 'chatml', a template, "
                        "or a file holding one")
    return path.read_text()


def resolve_prompt_format(prompt_format: str, tokenizer, chat_template: str = "", log=None) -> str:
    """--prompt_format as it applies to this tokenizer, once --chat_template's template is set on it: auto is chat where
    the tokenizer then has a chat template, else alpaca (said through `log`). The chat format is refused without a
    template, or with one that never marks the assistant's turn."""
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if prompt_format == "auto":
        prompt_format = "chat" if tokenizer.chat_template else "alpaca"
    if prompt_format == "chat":
        check_chat_template(tokenizer, "--prompt_format chat renders rows through a chat template", chat_template,
                            instead=", or --prompt_format alpaca")
    if log:
        log("prompt format: " + ("chat (alpaca and prompt_completion rows as user and assistant turns of the chat "
                                 "template, trained on the assistant's)" if prompt_format == "chat" else
                                 "alpaca ('### Instruction:' ... '### Response:'; prompt_completion rows as they are)"))
    return prompt_format


def check_chat_template(tokenizer, use: str, chat_template: str = "", instead: str = "") -> None:
    """A DataError unless the tokenizer has a chat template that marks the assistant's turn: `use` says what needs one,
    `chat_template` is --chat_template as given (it names the template), `instead` adds another way out."""
    if not tokenizer.chat_template:
        where = f"the tokenizer in {tokenizer.name_or_path}" if tokenizer.name_or_path else "the tokenizer"
        raise DataError(f"{use}, and {where} has none: {TEMPLATE_FIX}{instead}")
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    try:
        marked = (tokenizer.apply_chat_template(probe, tokenize=False)
                  != tokenizer.apply_chat_template([probe[0], {"role": "user", "content": "2"}], tokenize=False))
    except jinja2.TemplateError:  # raised by a template that checks the roles' order: it tells them apart
        marked = True
    if not marked:
        name = (f"--chat_template {chat_template:.80}" if chat_template else
                f"the chat template of the tokenizer in {tokenizer.name_or_path}")
        raise DataError(f"{name} never marks the assistant's turn: it renders an assistant message as it renders a "
                        "user's, so responses cannot be told from prompts; pass a template that writes each message's "
                        "role, such as --chat_template chatml")


def row_template(fmt: str, prompt_format: str, tokenizer) -> str | None:
    """The chat template that renders rows of `fmt`: the tokenizer's for chat rows and in the chat format; in the
    alpaca format ALPACA for alpaca rows and PLAIN for prompt_completion rows; none for text."""
    if fmt == "text":
        return None
    if fmt == "chat" or prompt_format == "chat":
        return tokenizer.chat_template
    return ALPACA if fmt == "alpaca" else PLAIN


# ----------------------------------------------------------------------------------------------------------------------
# Examples -> conversations -> (text, trained) segments -> tokens


def _str(value) -> str:
    return "" if value is None else str(value)  # CSV and parquet columns arrive as numbers, NaN/None for empty cells


def conversation(example: dict, fmt: str, prompt_format: str, system_prompt: str = "") -> list[dict]:
    """The messages of a chat example, checked; or an alpaca or prompt_completion example as a conversation: a system
    turn if `system_prompt`, the instruction and input (or the prompt) as the user's turn, the output (or the
    completion) as the assistant's. The input follows the instruction after a blank line, in the alpaca format under
    its own heading."""
    if fmt == "chat":
        return _checked_messages(example["messages"])
    if fmt == "prompt_completion":
        user, answer = _str(example["prompt"]), _str(example["completion"])
    else:
        user, answer = _str(example["instruction"]), _str(example["output"])
        if _str(example.get("input")):
            user += (ALPACA_INPUT if prompt_format == "alpaca" else "\n\n") + _str(example["input"])
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _checked_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"'messages' must be a list of {{role, content}} objects, not {messages!r:.80}")
    for j, message in enumerate(messages):
        # arrow gives every message every key seen in the column: a key missing from this one reads as None
        missing = [key for key in ("role", "content") if message.get(key) is None]
        if missing:
            has = sorted(k for k, v in message.items() if v is not None)
            raise DataError(f"message {j} has no {' and no '.join(map(repr, missing))} (it has {has}); every message "
                            "needs a role and a content")
        # a list of parts ([{type, text}], OpenAI's form) or a number: the template would fail on it with a traceback
        if not isinstance(content := message["content"], str):
            kind = {list: "a list", dict: "an object"}.get(type(content), f"a {type(content).__name__}")
            raise DataError(f"message {j}'s content is {kind} ({content!r:.60}), not text; give each message's content "
                            "as one string")
    return messages


def render(example: dict) -> tuple[str, str]:
    """(prompt, response) text of an alpaca or prompt/completion example in the alpaca format, without BOS and EOS:
    what the built-in tokenizer is trained on."""
    from transformers.utils.chat_template_utils import render_jinja_template

    fmt = "prompt_completion" if "prompt" in example and "completion" in example else "alpaca"
    *prompt, response = conversation(example, fmt, "alpaca")
    rendered, _ = render_jinja_template([prompt], chat_template=row_template(fmt, "alpaca", None),
                                        add_generation_prompt=True, bos_token="", eos_token="")
    return rendered[0], response["content"]


def segments(messages: list[dict], tokenizer, template: str) -> list[tuple[str, bool]]:
    """The conversation rendered by `template`, in pieces, each marked trained (an assistant turn) or not."""
    def text(upto: int, add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, chat_template=template,
                                             add_generation_prompt=add_generation_prompt)

    def opening() -> int:
        """Where the first message's content begins: transformers renders no empty conversation, so this is what two
        renders of that message alone, with different contents, share (a default system turn, the turn's header)."""
        a, b = (tokenizer.apply_chat_template([{**messages[0], "content": c}], tokenize=False, chat_template=template)
                for c in ("a", "b"))
        return len(os.path.commonprefix([a, b]))

    full = text(len(messages))
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(text(i, add_generation_prompt=True)) if i else opening(), len(text(i + 1))
        if not full.startswith(text(i + 1)) or start < done:
            raise DataError("the chat template does not render a conversation's turns as prefixes of the whole, so "
                            "assistant turns cannot be located; use --chat_template chatml")
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    if not pieces:
        raise DataError(f"a chat example has no assistant turn (roles: {[m['role'] for m in messages]})")
    return pieces + [(full[done:], False)]


def tokenize(example: dict, tokenizer, seq_len: int, fmt: str, prompt_format: str, system_prompt: str = "",
             train_on_prompt: bool = False) -> dict:
    """input_ids and labels, at most seq_len long, plus `truncated` and `dropped` flags for the report.

    A conversation is rendered by its row_template, which writes BOS and the end of each turn; a text row is BOS, the
    text and EOS. Too long: prompt tokens are cut from the left first (after BOS; the prompt's end, next to the
    response, matters most), then the response loses its end. An example with an empty response is dropped (the end
    of its turn alone teaches nothing), and so is one with no target left.
    """
    if fmt == "text":
        text = _str(example["text"])
        pieces, has_response = [(text, True)], bool(text)
    else:
        messages = conversation(example, fmt, prompt_format, system_prompt)
        pieces = segments(messages, tokenizer, row_template(fmt, prompt_format, tokenizer))
        has_response = any(_str(m["content"]) for m in messages if m["role"] == "assistant")
    ids, trained = [], []
    for text, is_response in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        trained += [is_response or train_on_prompt] * len(piece)
    if fmt == "text":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids, trained = bos + ids + [tokenizer.eos_token_id], [train_on_prompt] * len(bos) + trained + [True]
    truncated = len(ids) > seq_len
    if truncated:
        keep = int(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)  # keep BOS
        first = trained.index(True) if True in trained else len(ids)
        cut = min(len(ids) - seq_len, max(0, first - keep))
        ids, trained = ids[:keep] + ids[keep + cut:], trained[:keep] + trained[keep + cut:]
        ids, trained = ids[:seq_len], trained[:seq_len]
    # The first token is never a target: nothing of its own example precedes it (packed, the previous example would).
    labels = [IGNORE] + [i if t else IGNORE for i, t in zip(ids[1:], trained[1:])]
    # dropped: no response, or none of it left after the cut (at --seq_len 1, every row is BOS alone)
    dropped = not has_response or all(label == IGNORE for label in labels)
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "dropped": dropped}


def tokenize_batch(batch: dict, indices: list[int], tokenizer, seq_len: int, fmt: str, prompt_format: str,
                   system_prompt: str = "", train_on_prompt: bool = False) -> dict:
    """datasets.map(batched=True, with_indices=True) form of `tokenize`, each row with the index of its `example`.
    Plain text longer than seq_len is split into several rows (continued pre-training loses nothing); other formats
    give one row per example."""
    out = {"input_ids": [], "labels": [], "truncated": [], "dropped": [], "example": []}
    for i, index in enumerate(indices):
        example = {k: batch[k][i] for k in batch}
        try:
            row = tokenize(example, tokenizer, 10**12 if fmt == "text" else seq_len, fmt, prompt_format, system_prompt,
                           train_on_prompt)
        except DataError as e:
            raise DataError(f"row {index} (counting from 0): {e}") from None
        for start in range(0, len(row["input_ids"]), seq_len):
            for key in ("input_ids", "labels"):
                out[key].append(row[key][start:start + seq_len])
            out["truncated"].append(row["truncated"])
            out["dropped"].append(row["dropped"])
            out["example"].append(index)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The whole preparation, as train.py runs it


def prepare(cfg: DataConfig, tokenizer, local_rank: int = 0, log=print):
    """(train, eval or None) tokenized datasets for `cfg`. Rank 0 of each node tokenizes and fills the datasets
    cache; the other ranks wait for it (FirstOnNode), then read that cache instead of repeating the work. The
    tokenizer is left with its pad token, the chat template that rendered the training rows, and no BOS where its BOS
    opens the template's turns (drop_turn_opener_bos)."""
    ensure_pad_token(tokenizer)
    cfg = dataclasses.replace(cfg, prompt_format=resolve_prompt_format(cfg.prompt_format, tokenizer, cfg.chat_template))
    drop_turn_opener_bos(tokenizer)
    distributed = dist.is_available() and dist.is_initialized()
    local = cfg.dataset == BUILTIN_DATASET or Path(cfg.dataset).expanduser().exists()
    for flag, value in (("dataset_split", cfg.dataset_split if cfg.dataset_split != "train" else ""),
                        ("dataset_config", cfg.dataset_config)):
        if local and value:  # load_raw reads every row of local data: the run would train on what was not asked for
            raise DataError(f"--{flag} {value!r} chooses within a Hub dataset, and --dataset {cfg.dataset} is local: "
                            "leave it out, or point --dataset at the file or folder to train on")
    eval_file = bool(cfg.eval_split) and Path(cfg.eval_split).expanduser().exists()
    if cfg.eval_split and not eval_file and local:
        # load_raw would read the training files again: the eval loss would be measured on the training data
        raise DataError(f"--eval_split {cfg.eval_split!r}: no such file, and the local dataset {cfg.dataset} has no "
                        "splits; pass a file or folder to --eval_split, or carve one out with --eval_fraction")
    # The store the process group met in (torch has no public accessor for it); its timeout is the group's,
    # --dist_timeout
    store = dist.distributed_c10d._get_default_store() if distributed else None
    node = FirstOnNode(store, dist.get_rank(), local_rank, store.timeout.total_seconds()) if store else None
    if node and local_rank != 0:
        node.wait()
    try:
        train, evals = _train_and_eval(cfg, tokenizer, eval_file, log)
    finally:
        if node and local_rank == 0:
            node.done()  # failed or not: the others go on, and meet the same error on their own
    return train, evals


class FirstOnNode:
    """Rank 0 of each node works first (tokenizing into the node's datasets cache) while the node's other ranks wait.

    They wait on the process group's store, not in a collective: a collective gives up after --dist_timeout, however
    long the work rightly takes (millions of chat rows take longer than the default 15 minutes). So that a dead or
    hung rank 0 still ends the wait, it adds to a counter in the store every second while it works; the others
    give up once the counter has been still for `patience_s`. torchrun numbers the ranks of a node consecutively, so
    rank - local rank is the node's rank 0.
    """

    def __init__(self, store: dist.Store, rank: int, local_rank: int, patience_s: float):
        self.store, self.rank, self.first, self.patience_s = store, rank, rank - local_rank, patience_s
        self.ready, self.alive = f"data/{self.first}/ready", f"data/{self.first}/alive"
        self.stopped = threading.Event()
        if local_rank == 0:
            threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while not self.stopped.wait(min(1.0, self.patience_s / 4)):
            self.store.add(self.alive, 1)

    def done(self) -> None:
        self.stopped.set()
        self.store.set(self.ready, "1")

    def wait(self) -> None:
        beats, since = -1, time.monotonic()
        while not self.store.check([self.ready]):
            if (now := self.store.add(self.alive, 0)) != beats:
                beats, since = now, time.monotonic()
            elif time.monotonic() - since >= self.patience_s:
                raise TimeoutError(
                    f"rank {self.rank}: rank {self.first}, which prepares the data on this node, has shown no progress "
                    f"for {self.patience_s:g} s (--dist_timeout): it died or hung, and its log says why; relaunch "
                    "once that is fixed")
            time.sleep(0.5)  # a round trip to the store each time, from every waiting rank of every node


def _train_and_eval(cfg: DataConfig, tokenizer, eval_file: bool, log):
    raw, fmt = _examples(load_raw(cfg.dataset, cfg.dataset_config, cfg.dataset_split, log), cfg.dataset, cfg,
                         tokenizer, log)
    train, evals = _tokenized(raw, fmt, cfg.dataset, cfg, tokenizer, log), None
    if cfg.eval_split:
        source, split = (cfg.eval_split, "train") if eval_file else (cfg.dataset, cfg.eval_split)
        eval_raw, eval_fmt = _examples(load_raw(source, cfg.dataset_config, split, log), source, cfg, tokenizer, log)
        evals = _tokenized(eval_raw, eval_fmt, source, cfg, tokenizer, log)
    elif cfg.eval_fraction > 0:
        train, evals = _carve(train, len(raw), cfg)
    if fmt != "text":  # what run folders save (module docstring); set last, so that every row met the same tokenizer
        tokenizer.chat_template = row_template(fmt, cfg.prompt_format, tokenizer)
    return _packed(train, cfg, log), None if evals is None else _packed(evals, cfg, log)


def _examples(raw, source: str, cfg: DataConfig, tokenizer, log):
    """The examples with --field_map applied, and their format; chat rows need a chat template."""
    raw = apply_field_map(raw, cfg.field_map)
    fmt = detect_format(raw.column_names, cfg.dataset_format)
    if cfg.dataset_format == "auto":
        log(f"dataset format: {fmt} (detected from columns {raw.column_names})")
    check_text_columns(raw, fmt, source)
    if fmt == "chat":
        if cfg.system_prompt:  # conversation leaves chat rows as they are: the run would train without it
            raise DataError(f"--system_prompt: {source} holds chat rows, whose system turn is among their messages; "
                            "leave --system_prompt out, or give the rows a system message")
        check_chat_template(tokenizer, f"{source} holds chat rows (messages), which a chat template renders",
                            cfg.chat_template)
    return raw, fmt


def _carve(rows, n_examples: int, cfg: DataConfig):
    """(train, eval) rows: --eval_fraction of the examples held out with --seed, each with all its rows. Split rows
    instead, and a document's other rows would be trained on: the eval loss would read too low."""
    held_out = [False] * n_examples
    n_eval = math.ceil(cfg.eval_fraction * n_examples)  # as datasets' train_test_split counts, with its permutation
    for i in numpy.random.default_rng(cfg.seed).permutation(n_examples)[:n_eval]:
        held_out[i] = True
    train, evals = [], []  # row numbers; a dropped example has none
    for row, example in enumerate(rows["example"]):
        (evals if held_out[example] else train).append(row)
    if not train or not evals:
        left = "none to train on; lower it" if not train else "nothing to evaluate; raise it"
        raise DataError(f"--eval_fraction {cfg.eval_fraction} of the {n_examples} examples of {cfg.dataset} leaves "
                        f"{left} or add data")
    return rows.select(train), rows.select(evals)


def _tokenized(raw, fmt: str, source: str, cfg: DataConfig, tokenizer, log):
    """The rows of `raw`'s examples that have something to train on, each with its `example`; the counts logged."""
    try:
        ds = raw.map(tokenize_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                     desc="tokenizing", fn_kwargs=dict(tokenizer=tokenizer, seq_len=cfg.seq_len, fmt=fmt,
                                                       prompt_format=cfg.prompt_format,
                                                       system_prompt=cfg.system_prompt,
                                                       train_on_prompt=cfg.train_on_prompt))
    except DataError as e:  # datasets re-raises the function's own exception, as it was
        raise DataError(f"{source}, {e}") from None
    n_truncated, n_dropped = sum(ds["truncated"]), sum(ds["dropped"])
    ds = ds.filter(lambda dropped: not dropped, input_columns="dropped").remove_columns(["truncated", "dropped"])
    log(f"{len(raw)} examples: {n_truncated} truncated to {cfg.seq_len} tokens, {n_dropped} dropped (nothing "
        f"left to train on), {len(ds)} kept")
    if len(ds) == 0:
        raise DataError(f"no example of {source} is left after filtering: check the format and --seq_len")
    return ds


def _packed(rows, cfg: DataConfig, log):
    """The rows as training takes them: packed with --packing, without their `example`."""
    if not cfg.packing:
        return rows.remove_columns("example")
    ds = pack(rows, cfg.seq_len)
    log(f"packed into {len(ds)} rows of {cfg.seq_len}: {packing_efficiency(ds, cfg.seq_len):.1%} of slots are real")
    return ds


def ensure_pad_token(tokenizer) -> None:
    """Many base models ship no pad token; padding is masked out of attention and loss, so EOS can serve."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def drop_turn_opener_bos(tokenizer) -> None:
    """No BOS where the tokenizer's is the token its chat template opens every turn with (SmolLM2 names ChatML's
    <|im_start|> its BOS, and encodes no text with it): before an alpaca-format or a text row it would open a turn
    with no role. The run folders save the tokenizer without it, so generate.py renders their prompts alike."""
    if tokenizer.bos_token is None or not tokenizer.chat_template:
        return
    turns = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    if tokenizer.apply_chat_template(turns, tokenize=False).count(tokenizer.bos_token) >= len(turns):
        tokenizer.bos_token = None


def fingerprint(ds) -> str:
    """A hash of the tokenized rows in order (input ids, labels, and positions when packed): what a resumed run must
    train on again. It changes with the files, the tokenizer and every tokenizing setting, and not with a file's
    path."""
    h = hashlib.sha256()
    columns = [c for c in ("input_ids", "labels", "position_ids") if c in ds.column_names]
    for table in ds.with_format("arrow", columns=columns).iter(batch_size=2**16):
        for name in columns:
            rows = table.column(name).combine_chunks()  # a list column: row lengths, then all values
            h.update(rows.value_lengths().to_numpy(zero_copy_only=False).tobytes())
            h.update(rows.flatten().to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Packing: whole examples side by side in rows of seq_len, with positions restarting at each example


def pack(ds, seq_len: int):
    """Best-fit decreasing: longest examples first, each into the fullest row that still has room. O(n log n)."""
    import datasets

    lengths = [len(x) for x in ds["input_ids"]]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            rows.append([i])
            room, row = seq_len - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, row))
    ids, labels = ds["input_ids"], ds["labels"]
    return datasets.Dataset.from_dict({
        "input_ids": [sum((ids[i] for i in row), []) for row in rows],
        "labels": [sum((labels[i] for i in row), []) for row in rows],
        "position_ids": [sum((list(range(lengths[i])) for i in row), []) for row in rows],
    })


def packing_efficiency(ds, seq_len: int) -> float:
    return sum(len(x) for x in ds["input_ids"]) / (len(ds) * seq_len)


def packed_attention(device: torch.device) -> str:
    """flash-attention's variable-length kernel reads example boundaries from position_ids, with no mask at all;
    elsewhere (CPU, GPUs without flash-attn) SDPA gets an explicit block-diagonal causal mask."""
    import importlib.util

    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


# ----------------------------------------------------------------------------------------------------------------------
# Batches


def collate(rows: list[dict], pad_id: int, block_mask: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padded rows get a 2D attention mask; packed rows (with position_ids) get a 4D
    block-diagonal causal mask, or none when flash-attention finds the boundaries from position_ids."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], real[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), True
    batch = {"input_ids": ids, "labels": labels, "num_tokens": real.sum()}
    if "position_ids" not in rows[0]:
        return batch | {"attention_mask": real.long()}
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        pos[i, : len(r["position_ids"])] = torch.tensor(r["position_ids"])
    batch["position_ids"] = pos
    if block_mask:
        segment = torch.cumsum(pos == 0, dim=1).masked_fill(~real, -1)  # example number within the row; -1: padding
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        mask = (segment[:, :, None] == segment[:, None, :]) & causal
        # padding attends to itself only: a query row with nothing to attend to gives NaN, even where it is unused
        batch["attention_mask"] = (mask & (segment[:, :, None] >= 0) | torch.eye(width, dtype=torch.bool))[:, None]
    return batch


class LengthGroupedSampler(Sampler):
    """Batches of similar length, to waste less compute on padding: shuffle, sort within windows of 64 batches,
    shuffle the batches. Same order on every rank for a given seed and epoch; each rank takes every world-th batch."""

    def __init__(self, lengths: list[int], batch_size: int, rank: int, world: int, seed: int):
        self.lengths, self.batch_size, self.rank, self.world = lengths, batch_size, rank, world
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        window = 64 * self.batch_size
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: -self.lengths[i])]
        batches = [order[b:b + self.batch_size] for b in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(batches)
        return batches[: len(batches) // self.world * self.world][self.rank::self.world]

    def __iter__(self):
        return (i for batch in self._batches() for i in batch)

    def __len__(self) -> int:
        return len(self._batches()) * self.batch_size


def build_loader(ds, batch_size: int, pad_id: int, rank: int, world: int, seed: int, group_by_length: bool = False,
                 block_mask: bool = True) -> DataLoader:
    """Each rank sees a disjoint share of the rows, reshuffled each epoch by `loader.sampler.set_epoch(epoch)`."""
    if group_by_length:
        sampler = LengthGroupedSampler([len(x) for x in ds["input_ids"]], batch_size, rank, world, seed)
    else:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Its own generator: iter(loader) draws a seed from it each epoch, which from the global one would shift the
    # RNG stream of LoRA dropout, and a resumed run could not restore it exactly.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, generator=torch.Generator(),
                      collate_fn=lambda rows: collate(rows, pad_id, block_mask))


def eval_batches(ds, batch_size: int, pad_id: int, rank: int, world: int, block_mask: bool = True) -> list[dict]:
    """Every eval row exactly once over all ranks (no padding by repetition, which would bias the loss), and the same
    number of batches on every rank, because each FSDP forward is a collective: short ranks add a batch with no
    label."""
    mine = ds.select(range(rank, len(ds), world))
    batches = [collate([mine[j] for j in range(i, min(i + batch_size, len(mine)))], pad_id, block_mask)
               for i in range(0, len(mine), batch_size)]
    most = -(-len(ds.select(range(0, len(ds), world))) // batch_size)  # rank 0 has the most rows
    filler = collate([ds[0]], pad_id, block_mask)
    filler["labels"].fill_(IGNORE)
    return batches + [filler] * (most - len(batches))


# ----------------------------------------------------------------------------------------------------------------------
# Inspection: `python train.py --dataset D --show 3`


def describe(ds, tokenizer, seq_len: int, show: int, color: bool) -> str:
    """Rendered rows with trained tokens marked, then statistics: what a user checks before spending GPU hours."""
    start, end = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    out = []
    for i in range(min(show, len(ds))):
        ids, labels, text, inside = ds[i]["input_ids"], ds[i]["labels"], "", False
        for tok, lab in zip(ids, labels):
            if (lab != IGNORE) != inside:
                text, inside = text + (start if not inside else end), not inside
            text += tokenizer.decode([tok])
        out.append(f"--- row {i} ({len(ids)} tokens, {sum(l != IGNORE for l in labels)} trained) ---\n"
                   f"{text + (end if inside else '')}")
    lengths = sorted(len(x) for x in ds["input_ids"])
    trained = sum(sum(l != IGNORE for l in x) for x in ds["labels"])
    # inclusive: percentiles of these rows; the default (exclusive) extrapolates past the longest row on few rows
    q = statistics.quantiles(lengths, n=100, method="inclusive") if len(lengths) > 1 else lengths * 99
    out.append(f"--- {len(ds)} rows, {sum(lengths):,} tokens, {trained:,} trained "
               f"({trained / max(1, sum(lengths)):.1%})"
               f"\nlength: min {lengths[0]}, median {q[49]:.0f}, p90 {q[89]:.0f}, p99 {q[98]:.0f}, max {lengths[-1]}"
               f" (seq_len {seq_len}); slots filled: {packing_efficiency(ds, seq_len):.1%}")
    return "\n".join(out)
