"""Datasets to batches: every format, exact loss masks, truncation that keeps responses, packing without leakage."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import builtin
import data
import train

ALPACA = [{"instruction": "Name the capital.", "input": "Peru", "output": "Lima"},
          {"instruction": "Give the opposite of this long word.", "input": "", "output": "a much longer answer here"}]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                      {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "And Chile?"},
                      {"role": "assistant", "content": "Santiago"}]}]


@pytest.fixture
def tokenizer():
    """The built-in tokenizer with ChatML: a fresh one for each test, as data.prepare leaves on it the template that
    rendered the rows."""
    tok = builtin.make_tokenizer()
    tok.chat_template = data.CHATML
    return tok


def cfg(dataset, **kw):
    """The data settings, with their defaults."""
    return data.DataConfig(dataset=str(dataset), **kw)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != data.IGNORE])


# ---------------------------------------------------------------------------------------------------------------------
# Formats and masks


def test_labels_are_ignored_exactly_on_prompt_and_padding(tokenizer):
    rows = [data.tokenize(ex, tokenizer, 64, "alpaca", "alpaca") for ex in ALPACA]
    batch = data.collate(rows, tokenizer.pad_token_id)
    for i, ex in enumerate(ALPACA):
        prompt, response = data.render(ex)
        n_prompt = 1 + len(tokenizer.encode(prompt, add_special_tokens=False))  # BOS + prompt
        n_resp = len(tokenizer.encode(response, add_special_tokens=False)) + 1  # response + EOS
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        expected = torch.full_like(labels, data.IGNORE)
        expected[n_prompt:n_prompt + n_resp] = ids[n_prompt:n_prompt + n_resp]
        assert torch.equal(labels, expected)
        assert mask.sum() == n_prompt + n_resp and mask[: n_prompt + n_resp].all()
        assert tokenizer.decode(ids[n_prompt:n_prompt + n_resp - 1]) == response


def test_chat_trains_on_assistant_turns_only(tokenizer):
    row = data.tokenize(CHAT[0], tokenizer, 256, "chat", "chat")
    assert trained_text(tokenizer, row) == "Lima<|im_end|>\nSantiago<|im_end|>\n"
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CHAT[0]["messages"], tokenize=False)


def test_train_on_prompt_trains_on_everything(tokenizer):
    row = data.tokenize(ALPACA[0], tokenizer, 64, "alpaca", "alpaca", train_on_prompt=True)
    assert row["labels"][1:] == row["input_ids"][1:] and row["labels"][0] == data.IGNORE  # BOS predicts nothing


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_type_and_format_is_detected(tmp_path, tokenizer, suffix):
    import datasets

    cases = {"alpaca": ALPACA, "prompt_completion": [{"prompt": "2+2=", "completion": "4"}] * 3,
             "text": [{"text": "plain words " * 5}] * 3}
    if suffix != ".csv":  # a CSV cannot hold a list of messages
        cases["chat"] = CHAT * 3
    for fmt, rows in cases.items():
        path = tmp_path / f"{fmt}{suffix}"
        getattr(datasets.Dataset.from_list(rows), {".jsonl": "to_json", ".json": "to_json", ".parquet": "to_parquet",
                                                    ".csv": "to_csv"}[suffix])(str(path))
        logs = []
        train, evals = data.prepare(cfg(path, seq_len=128), tokenizer, log=logs.append)
        assert f"dataset format: {fmt}" in logs[0] and len(train) == len(rows) and evals is None
        assert all(any(lab != data.IGNORE for lab in r) for r in train["labels"])


def test_txt_files_and_folders_are_text(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.txt").write_text("third line\n")
    train, _ = data.prepare(cfg(tmp_path, seq_len=64), tokenizer, log=lambda *_: None)
    assert sorted(tokenizer.decode(r[1:-1]) for r in train["input_ids"]) == ["first line", "second line", "third line"]


def test_field_map_renames_columns(tmp_path, tokenizer):
    path = write(tmp_path / "qa.jsonl", [{"question": "Capital of Peru?", "answer": "Lima"}] * 2)
    train, _ = data.prepare(cfg(path, field_map="instruction=question,output=answer"), tokenizer, log=lambda *_: None)
    assert trained_text(tokenizer, train[0]) == "Lima<|im_end|>\n"  # through the tokenizer's chat template


# ---------------------------------------------------------------------------------------------------------------------
# Truncation


def test_long_prompt_is_cut_from_the_left_and_the_response_kept(tokenizer):
    row = data.tokenize({"instruction": "word " * 200, "output": "the answer stays"}, tokenizer, 32, "alpaca",
                        "alpaca")
    response = tokenizer.encode("the answer stays", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(row["input_ids"]) == 32 and row["input_ids"][0] == tokenizer.bos_token_id and row["truncated"]
    assert row["input_ids"][-len(response):] == response and row["labels"][-len(response):] == response
    assert tokenizer.decode(row["input_ids"][1:-len(response)]).endswith("### Response:\n")


def test_long_text_becomes_rows_and_empty_responses_are_dropped_and_counted(tmp_path, tokenizer):
    long_text = " ".join(f"w{i}" for i in range(300))
    path = write(tmp_path / "t.jsonl", [{"text": long_text}])
    train, _ = data.prepare(cfg(path, seq_len=64), tokenizer, log=lambda *_: None)
    assert len(train) > 1 and all(len(r) <= 64 for r in train["input_ids"])
    assert sum(len(r) for r in train["input_ids"]) >= len(tokenizer.encode(long_text, add_special_tokens=False))
    logs = []
    path = write(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "x", "output": ""},
                                        {"instruction": "y " * 99, "output": "z"}])
    train, _ = data.prepare(cfg(path, seq_len=32, prompt_format="alpaca"), tokenizer, log=logs.append)
    assert len(train) == 2 and "1 truncated to 32 tokens, 1 dropped" in logs[1]  # the empty output is dropped


# ---------------------------------------------------------------------------------------------------------------------
# Packing


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()


def packed_examples(tokenizer, n=7):
    examples = [{"instruction": f"Task {i} " + "more words " * i, "output": "answer " * (i + 1)} for i in range(n)]
    return [data.tokenize(ex, tokenizer, 64, "alpaca", "alpaca") for ex in examples]


def test_packing_fills_rows_with_whole_examples(tokenizer):
    import datasets

    rows = packed_examples(tokenizer, 20)
    packed = data.pack(datasets.Dataset.from_list(rows), 128)
    assert all(len(r) <= 128 for r in packed["input_ids"])
    assert sorted(map(tuple, (r["input_ids"] for r in rows))) == sorted(
        tuple(row[s:e]) for row, pos in zip(packed["input_ids"], packed["position_ids"])
        for s, e in zip([i for i, p in enumerate(pos) if p == 0],
                        [i for i, p in enumerate(pos) if p == 0][1:] + [len(pos)]))
    assert data.packing_efficiency(packed, 128) > 0.9


def test_packed_logits_and_loss_equal_unpacked(tokenizer, tiny_model):
    """No token attends across an example boundary: each packed example's logits are its own, and the packed loss is
    the token-weighted loss of the examples run one at a time."""
    import datasets

    rows = packed_examples(tokenizer)
    packed = data.pack(datasets.Dataset.from_list(rows), 160)
    batch = data.collate([packed[i] for i in range(len(packed))], tokenizer.pad_token_id)
    assert len(packed) < len(rows)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits
        total, count = 0.0, 0
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            single = tiny_model(input_ids=ids).logits[0]
            where = [(b, s) for b in range(len(packed)) for s in range(batch["input_ids"].shape[1] - ids.shape[1] + 1)
                     if torch.equal(batch["input_ids"][b, s:s + ids.shape[1]], ids[0])
                     and batch["position_ids"][b, s] == 0]
            b, s = where[0]
            torch.testing.assert_close(logits[b, s:s + ids.shape[1]], single, rtol=1e-4, atol=1e-4)
            labels = torch.tensor(r["labels"])
            total += torch.nn.functional.cross_entropy(single[:-1], labels[1:], ignore_index=data.IGNORE,
                                                       reduction="sum").item()
            count += (labels[1:] != data.IGNORE).sum().item()
        flat_labels = batch["labels"][:, 1:].flatten()
        packed_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), flat_labels,
                                                        ignore_index=data.IGNORE)
    # a row's first label would be predicted from the previous example's last token: it must never be trained
    assert (batch["labels"][batch["position_ids"] == 0] == data.IGNORE).all()
    assert packed_loss.item() == pytest.approx(total / count, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Eval split, grouping


def test_eval_fraction_is_carved_with_the_seed(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)])
    a, ea = data.prepare(cfg(path, eval_fraction=0.25, seed=3), tokenizer, log=lambda *_: None)
    b, eb = data.prepare(cfg(path, eval_fraction=0.25, seed=3), tokenizer, log=lambda *_: None)
    assert len(ea) == 10 and len(a) == 30 and ea["input_ids"] == eb["input_ids"]
    assert not {tuple(x) for x in a["input_ids"]} & {tuple(x) for x in ea["input_ids"]}


def test_eval_batches_cover_each_row_once_with_equal_counts_per_rank(tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([data.tokenize({"text": f"row {i}"}, tokenizer, 16, "text", "alpaca")
                                     for i in range(7)])
    per_rank = [data.eval_batches(ds, 2, tokenizer.pad_token_id, rank, 2) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    seen = [tuple(row[m.bool()].tolist()) for batches in per_rank for b in batches
            for row, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]) if (lab != data.IGNORE).any()]
    assert sorted(seen) == sorted(tuple(r) for r in ds["input_ids"])


def test_length_grouped_batches_are_disjoint_across_ranks_and_homogeneous(tokenizer):
    lengths = [(i * 37) % 100 + 1 for i in range(256)]
    batches = [list(data.LengthGroupedSampler(lengths, 8, rank, 2, seed=0)) for rank in range(2)]
    assert not set(batches[0]) & set(batches[1]) and len(batches[0]) == len(batches[1]) == 128
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b)
              for b in (batches[0][j:j + 8] for j in range(0, 128, 8))]
    assert max(spread) < 20  # random batches of 8 from 1..100 spread ~75


def test_ranks_see_disjoint_rows(tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([data.tokenize({"text": f"row {i}"}, tokenizer, 16, "text", "alpaca")
                                     for i in range(16)])
    seen = [{tuple(r.tolist()) for b in data.build_loader(ds, 4, tokenizer.pad_token_id, rank, 2, 0)
             for r in b["input_ids"]} for rank in range(2)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before training


@pytest.mark.parametrize("setup, kwargs, message", [
    (lambda p: p / "missing.jsonl", {}, "no such file or folder"),
    (lambda p: (p / "d.xml").write_text("<a/>") and p / "d.xml", {}, "need one file type"),
    (lambda p: write(p / "d.jsonl", [{"question": "q", "answer": "a"}]), {},
     r"cannot tell the format from the columns \['question', 'answer'\]"),
    (lambda p: write(p / "d.jsonl", [{"question": "q"}]), {"dataset_format": "alpaca"},
     r"needs columns \['instruction', 'output'\]; the columns are \['question'\]"),
    (lambda p: write(p / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]), {}, "no assistant turn"),
    (lambda p: write(p / "d.jsonl", [{"q": 1}]), {"field_map": "instruction=question"}, "no column 'question'"),
    (lambda p: write(p / "d.jsonl", [{"q": 1}]), {"field_map": "instruction"},
     r"^--field_map instruction: not ours=theirs \(e\.g\. instruction=question\)$"),
    (lambda p: write(p / "d.jsonl", [{"q": 1}]), {"field_map": "=q"},
     r"^--field_map =q: not ours=theirs \(e\.g\. instruction=question\)$"),
    (lambda p: write(p / "d.jsonl", [{"text": ""}]), {}, "no example"),
])
def test_bad_dataset_errors(tmp_path, tokenizer, setup, kwargs, message):
    with pytest.raises(data.DataError, match=message):
        data.prepare(cfg(setup(tmp_path), **kwargs), tokenizer, log=lambda *_: None)


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", b"", r"d\.jsonl holds no rows: the file is empty"),
    ("d.jsonl", b'{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n',
     r"d\.jsonl:3: not valid JSON \(Expecting ',' delimiter at column 13\)"),  # the blank line 2 counts
    ("d.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n',
     r"d\.jsonl:2: the byte at offset 27 \(0xe9\) is not UTF-8; re-encode"),
    ("d.txt", b"first\ncaf\xe9\n", r"d\.txt:2: the byte at offset 9 \(0xe9\) is not UTF-8; re-encode"),
])
def test_bad_file_names_itself_and_its_line(tmp_path, tokenizer, name, content, message):
    """An empty file, a line that is not JSON, a byte that is not UTF-8: the error names the file and the line."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.prepare(cfg(tmp_path / name), tokenizer, log=lambda *_: None)


@pytest.mark.parametrize("rows, message", [
    (CHAT * 2 + [{"messages": [{"role": "user", "content": "hi"}, {"content": "Lima"}]}],
     r"row 2 \(counting from 0\): message 1 has no 'role' \(it has \['content'\]\)"),
    (CHAT * 2 + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}],
     r"row 2 \(counting from 0\): message 1 has no 'content'"),
    ([{"messages": "Capital of Peru?"}], r"row 0 \(counting from 0\): 'messages' must be a list of \{role, content\}"),
    ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant",
                                                                                   "content": "Lima"}]}],
     r"row 0 \(counting from 0\): message 0's content is a list \(\[\{'type': 'text', 'text': 'hi'\}\]\), not text; "
     r"give each message's content as one string$"),
])
def test_bad_chat_message_names_its_row(tmp_path, tokenizer, rows, message):
    """A chat message without role or content, or with content that is not text (OpenAI's list of parts, which the
    template would fail on with a traceback), or messages that are no list: the error names file, row and fault."""
    with pytest.raises(data.DataError, match=rf"c\.jsonl, {message}"):
        data.prepare(cfg(write(tmp_path / "c.jsonl", rows)), tokenizer, log=lambda *_: None)


def test_eval_split_of_a_local_dataset_must_be_a_file(tmp_path, tokenizer):
    """A local dataset has no splits: --eval_split validation is refused (it would evaluate on the training file), and
    --eval_split FILE evaluates on that file."""
    path = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)])
    with pytest.raises(data.DataError, match=r"--eval_split 'validation': no such file, and the local dataset "
                                             r".*d\.jsonl has no splits; pass a file .* or .*--eval_fraction"):
        data.prepare(cfg(path, eval_split="validation"), tokenizer, log=lambda *_: None)
    evals = write(tmp_path / "e.jsonl", [{"prompt": "held out", "completion": "out"}])
    train, ev = data.prepare(cfg(path, eval_split=str(evals)), tokenizer, log=lambda *_: None)
    assert len(train) == 4 and trained_text(tokenizer, ev[0]) == "out<|im_end|>\n"


@pytest.mark.parametrize("flag, value", [("dataset_split", "test"), ("dataset_config", "fr")])
def test_hub_only_flags_on_a_local_dataset_are_refused(tmp_path, tokenizer, flag, value):
    """--dataset_split and --dataset_config choose within a Hub dataset: on a local file (or the built-in data) they
    are refused by name, where they were ignored and the run trained on the whole file."""
    path = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)])
    for dataset in (path, data.BUILTIN_DATASET):
        with pytest.raises(data.DataError) as refusal:
            data.prepare(cfg(dataset, **{flag: value}), tokenizer, log=lambda *_: None)
        assert str(refusal.value) == (f"--{flag} {value!r} chooses within a Hub dataset, and --dataset {dataset} is "
                                      "local: leave it out, or point --dataset at the file or folder to train on")
    assert len(data.prepare(cfg(path, dataset_split="train"), tokenizer, log=lambda *_: None)[0]) == 4  # the default


def test_missing_chat_template_is_refused_by_us_naming_chatml(tmp_path, checkpoints):
    """A chat dataset, or --prompt_format chat, on a tokenizer without a template is refused in our words, naming
    --chat_template chatml (issue 25), and --chat_template chatml then trains it."""
    from transformers import AutoTokenizer

    path, model = write(tmp_path / "c.jsonl", CHAT), checkpoints("llama")
    bare = AutoTokenizer.from_pretrained(model)
    with pytest.raises(data.DataError) as refusal:
        data.prepare(cfg(path), bare, log=lambda *_: None)
    assert str(refusal.value) == (f"{path} holds chat rows (messages), which a chat template renders, and the "
                                  f"tokenizer in {model} has none: pass --chat_template chatml (or a Jinja template, "
                                  "or a file holding one)")
    with pytest.raises(data.DataError) as refusal:
        data.prepare(cfg(write(tmp_path / "a.jsonl", ALPACA), prompt_format="chat"), bare, log=lambda *_: None)
    assert str(refusal.value) == (f"--prompt_format chat renders rows through a chat template, and the tokenizer in "
                                  f"{model} has none: pass --chat_template chatml (or a Jinja template, or a file "
                                  "holding one), or --prompt_format alpaca")
    train, _ = data.prepare(cfg(path, chat_template="chatml"), bare, log=lambda *_: None)
    assert len(train) == 1


def test_missing_pad_token_is_handled(tokenizer):
    tok = builtin.make_tokenizer()
    tok.pad_token = None
    data.ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id


def test_show_marks_trained_tokens(tmp_path):
    """`python train.py --show 2` prints each row with its trained span between markers, then statistics, and
    trains nothing: no output_dir is made."""
    path = write(tmp_path / "d.jsonl", [ALPACA[0]] * 3)
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dataset", str(path), "--show", "2",
                          "--batch_size", "1", "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert out.stdout.count("### Response:\n[[Lima</s>]]") == 2
    assert "3 rows" in out.stdout and "median" in out.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Nothing read as something else, nothing left out in silence


def test_csv_cells_are_read_as_text(tmp_path, tokenizer):
    """Issue 24, defect 3: a CSV column of integers with an empty cell trains on '2', not '2.0'; 'NA' is an answer."""
    path = tmp_path / "n.csv"
    path.write_text("instruction,output\nadd,2\nmul,\nsub,3\nnone,NA\n")
    train, _ = data.prepare(cfg(path), tokenizer, log=lambda *_: None)
    assert sorted(trained_text(tokenizer, r) for r in train) == ["2<|im_end|>\n", "3<|im_end|>\n", "NA<|im_end|>\n"]


def test_rows_with_nothing_left_to_train_are_dropped(tmp_path, tokenizer):
    """Issue 24, defect 4: a row cut down to BOS trains nothing: it counts as dropped, and none left is refused."""
    logs = []
    with pytest.raises(data.DataError, match=r"no example of .*a\.jsonl is left after filtering: check the format "
                                             r"and --seq_len"):
        data.prepare(cfg(write(tmp_path / "a.jsonl", ALPACA), seq_len=1), tokenizer, log=logs.append)
    assert "2 examples: 2 truncated to 1 tokens, 2 dropped" in logs[-1]
    with pytest.raises(ValueError, match=r"--seq_len must be at least 2: a row's first token is never a target"):
        train.parse_config(["--seq_len", "1"])


def test_a_folder_reads_every_data_file_and_names_those_it_skips(tmp_path, tokenizer):
    """Issue 24, defect 6: a.jsonl, b.JSONL and c.jsonl.gz are all read (4 rows); notes.md is named as skipped."""
    import gzip

    write(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    write(tmp_path / "b.JSONL", [{"text": "three"}])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "four"}) + "\n")
    (tmp_path / "notes.md").write_text("# not data\n")
    logs = []
    train, _ = data.prepare(cfg(tmp_path, seq_len=16), tokenizer, log=logs.append)
    assert sorted(tokenizer.decode(r[1:-1]) for r in train["input_ids"]) == ["four", "one", "three", "two"]
    assert f"{tmp_path}: skipped notes.md (not a data file: .jsonl .json .parquet .csv .txt, or compressed .gz .bz2 " \
           ".xz)" in logs


@pytest.mark.parametrize("row, message", [
    ({"instruction": {"text": "greet"}, "output": "hello"},
     r"column 'instruction' holds a struct, not text \(\{'text': 'greet'\}\); make it a string, or map a text column "
     r"onto it with --field_map instruction=COLUMN"),
    ({"text": ["hello"]}, r"column 'text' holds a list, not text \(\['hello'\]\); make it a string, or map"),
])
def test_a_column_that_is_not_text_is_refused(tmp_path, tokenizer, row, message):
    """Issue 24, defect 7: a struct or list column is refused by name, never trained as its Python repr."""
    with pytest.raises(data.DataError, match=rf"d\.jsonl: {message}"):
        data.prepare(cfg(write(tmp_path / "d.jsonl", [row] * 2)), tokenizer, log=lambda *_: None)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_fraction_holds_out_whole_documents(tmp_path, tokenizer, packing):
    """Issue 24, defect 8: text documents cut into several rows each: no eval row's document has rows in training."""
    import re

    docs = [{"text": " ".join(f"d{i}w{j}" for j in range(30))} for i in range(8)]
    train, evals = data.prepare(cfg(write(tmp_path / "t.jsonl", docs), seq_len=16, eval_fraction=0.25, seed=1,
                                    packing=packing), tokenizer, log=lambda *_: None)
    doc_of = [{d for r in ds["input_ids"] for d in re.findall(r"d(\d)w", tokenizer.decode(r))} for ds in (train, evals)]
    assert len(train) > 8 and len(evals) > 2  # several rows a document
    assert len(doc_of[1]) == 2 and len(doc_of[0]) == 6 and not doc_of[0] & doc_of[1]


def test_eval_fraction_must_leave_rows_to_train(tmp_path, tokenizer):
    """Issue 24, defect 18: a fraction that leaves no training example is refused naming the flag."""
    with pytest.raises(ValueError, match=r"--eval_fraction must be in \[0, 0\.5\], got 0\.9999"):
        train.parse_config(["--eval_fraction", "0.9999"])
    path = write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(data.DataError, match=r"--eval_fraction 0\.5 of the 1 examples of .*d\.jsonl leaves none "
                                             r"to train on; lower it or add data"):
        data.prepare(cfg(path, eval_fraction=0.5), tokenizer, log=lambda *_: None)


def test_negative_seed_is_refused():
    """Issue 24, defect 19: --seed -1 is refused naming the flag, before numpy meets it in the eval carve-out."""
    with pytest.raises(ValueError, match=r"--seed must be in \[0, 2\*\*32\), got -1"):
        train.parse_config(["--seed", "-1", "--eval_fraction", "0.1"])


def test_field_map_onto_a_column_that_exists(tmp_path, tokenizer):
    """Issue 24, defect 20: mapping onto a name the dataset already has is refused naming the pair; a swap works."""
    path = write(tmp_path / "d.jsonl", [{"instruction": "the question", "output": "the answer"}] * 2)
    with pytest.raises(data.DataError, match=r"--field_map output=instruction: the dataset already has a column "
                                             r"'output'; map it too "
                                             r"\(a swap: 'output=instruction,instruction=output'\)"):
        data.prepare(cfg(path, field_map="output=instruction"), tokenizer, log=lambda *_: None)
    train, _ = data.prepare(cfg(path, field_map="output=instruction,instruction=output"), tokenizer,
                            log=lambda *_: None)
    assert trained_text(tokenizer, train[0]) == "the question<|im_end|>\n"


def test_json_object_holding_one_list_is_read_as_that_list(tmp_path, tokenizer):
    """Issue 24, defect 25: a .json holding {"data": [...]} trains on the 3 records of its list."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]}, indent=2))
    logs = []
    train, _ = data.prepare(cfg(path), tokenizer, log=logs.append)
    assert sorted(trained_text(tokenizer, r) for r in train) == ["c0<|im_end|>\n", "c1<|im_end|>\n", "c2<|im_end|>\n"]
    assert f"{path}: read the list 'data' of each file" in logs


def test_hidden_entries_of_a_folder_are_skipped_and_named(tmp_path):
    """A folder's hidden entries (an editor's swap file, .git/) are not data: 20 rows of a.jsonl are read, not 45, and
    each hidden entry is named as skipped."""
    write(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(20)])
    write(tmp_path / ".hidden.jsonl", [{"text": f"h{i}"} for i in range(20)])
    write(tmp_path / ".a.jsonl.swp.jsonl", [{"text": f"s{i}"} for i in range(5)])
    (tmp_path / ".git").mkdir()
    (tmp_path / "notes.md").write_text("# not data\n")
    logs = []
    assert data.load_raw(str(tmp_path), log=logs.append)["text"] == [f"a{i}" for i in range(20)]
    assert logs == [f"{tmp_path}: skipped notes.md (not a data file: .jsonl .json .parquet .csv .txt, or compressed "
                    ".gz .bz2 .xz); .a.jsonl.swp.jsonl, .git/, .hidden.jsonl (hidden: the name starts with '.')"]


@pytest.mark.parametrize("rows, line", [("add,2\nsub,3,4\nmul,6\n", 3), ('"a\nlong cell",1\nsub,"3",4\n', 4),
                                        ("add,2,x\nsub,3,y\n", 2)])
def test_a_csv_row_with_more_fields_than_its_header_is_refused_by_line(tmp_path, rows, line):
    """A CSV row with more fields than the header is refused naming file, line and header, before datasets reads it
    (a row of one extra field in every row would be read with its first field as an index, the others shifted)."""
    path = tmp_path / "bad.csv"
    path.write_text("instruction,output\n" + rows)
    with pytest.raises(data.DataError) as refusal:
        data.load_raw(str(path), log=lambda *_: None)
    assert str(refusal.value) == (f"{path}:{line}: 3 fields, where the header names 2 (instruction, output); quote a "
                                  'cell that holds a comma ("a, b"), or add its column to the header')


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_files_of_a_folder_with_different_columns_are_named(tmp_path, suffix):
    """A folder whose files differ in columns is refused naming both files and their columns, not datasets' error."""
    import datasets

    for name, rows in [("a", ALPACA), ("b", [{"prompt": "2+2=", "completion": "4"}] * 2)]:
        getattr(datasets.Dataset.from_list(rows), "to_csv" if suffix == ".csv" else "to_json")(
            str(tmp_path / (name + suffix)), **({} if suffix == ".csv" else {"lines": suffix == ".jsonl"}))
    with pytest.raises(data.DataError) as refusal:
        data.load_raw(str(tmp_path), log=lambda *_: None)
    assert str(refusal.value) == (f"cannot read {tmp_path} as one table: a{suffix} has the columns ['instruction', "
                                  f"'input', 'output'] and b{suffix} ['prompt', 'completion']; give every file the "
                                  "same columns, or move one out")


def test_json_object_holding_several_lists_is_refused(tmp_path):
    """A .json object holding two lists of records is refused naming the lists and the shape expected."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": [{"text": "x"}], "b": [{"text": "y"}]}))
    with pytest.raises(data.DataError) as refusal:
        data.load_raw(str(path), log=lambda *_: None)
    assert str(refusal.value) == (f"{path}: an object holding the lists ['a', 'b']; a .json file holds a list of "
                                  "records, or an object holding one list of records: keep one of them")


def test_show_needs_no_full_step(tmp_path, tokenizer, process_group):
    """Issue 24, defect 29: --show 1 on a one-row file with --batch_size 4 shows that row; no step is needed."""
    config = train.Config(dataset=str(write(tmp_path / "d.jsonl", [ALPACA[0]])), show=1, batch_size=4)
    batches = train.prepare_batches(config, tokenizer, len(tokenizer), torch.device("cpu"))
    shown = data.describe(batches.loader.dataset, tokenizer, config.seq_len, config.show, color=False)
    assert batches.rows == 1 and "<|im_start|>assistant\n[[Lima<|im_end|>\n]]" in shown and "--- 1 rows" in shown


def test_show_length_percentiles_lie_within_the_rows(tokenizer):
    """--show's length statistics on a few rows are numpy's percentiles of the row lengths: never above the longest
    row (statistics.quantiles' default extrapolated p90 and p99 of three rows past the max)."""
    import datasets
    import numpy as np

    lengths = [20, 17, 14]
    rows = datasets.Dataset.from_dict({"input_ids": [[5] * n for n in lengths], "labels": [[5] * n for n in lengths]})
    shown = data.describe(rows, tokenizer, 512, 0, color=False)
    median, p90, p99 = (f"{np.percentile(lengths, q):.0f}" for q in (50, 90, 99))
    assert f"length: min 14, median {median}, p90 {p90}, p99 {p99}, max 20 (seq_len 512)" in shown


# ---------------------------------------------------------------------------------------------------------------------
# The prompt format (issue 25): alpaca and prompt_completion rows through the chat template where there is one


def test_alpaca_and_prompt_completion_rows_go_through_the_chat_template(tmp_path, tokenizer):
    """On a tokenizer with a chat template, alpaca and prompt_completion rows are user and assistant turns of it (after
    --system_prompt's turn), trained on the assistant's turn only; --prompt_format alpaca keeps the alpaca template."""
    rows = [ALPACA[0], {"prompt": "2+2=", "completion": "4"}]
    chat, _ = data.prepare(cfg(write(tmp_path / "a.jsonl", rows[:1])), tokenizer, log=lambda *_: None)
    assert tokenizer.decode(chat[0]["input_ids"]) == ("<|im_start|>user\nName the capital.\n\nPeru<|im_end|>\n"
                                                      "<|im_start|>assistant\nLima<|im_end|>\n")
    assert trained_text(tokenizer, chat[0]) == "Lima<|im_end|>\n"
    system, _ = data.prepare(cfg(write(tmp_path / "p.jsonl", rows[1:]), system_prompt="Be brief."), tokenizer,
                             log=lambda *_: None)
    assert tokenizer.decode(system[0]["input_ids"]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                                        "2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert trained_text(tokenizer, system[0]) == "4<|im_end|>\n"
    alpaca, _ = data.prepare(cfg(tmp_path / "a.jsonl", prompt_format="alpaca"), tokenizer, log=lambda *_: None)
    assert tokenizer.decode(alpaca[0]["input_ids"]) == ("<s>### Instruction:\nName the capital.\n\n### Input:\nPeru"
                                                        "\n\n### Response:\nLima</s>")
    assert trained_text(tokenizer, alpaca[0]) == "Lima</s>"


def test_prompt_format_is_printed_shown_and_recorded(checkpoints, tmp_path, capsys):
    """--show prints the prompt format decided for this tokenizer (auto: chat with --chat_template chatml) and rows
    rendered in it; a run records it in train_config.json as decided, not as 'auto'."""
    from conftest import common, run_inprocess

    path = write(tmp_path / "a.jsonl", [ALPACA[0]] * 4)
    flags = ["--model", str(checkpoints("llama")), "--dataset", str(path), "--chat_template", "chatml"]
    run_inprocess(flags + ["--show", "1", "--output_dir", str(tmp_path / "shown")])
    shown = capsys.readouterr().out
    assert "prompt format: chat (alpaca and prompt_completion rows as user and assistant turns of the chat template" \
           in shown
    assert "<|im_start|>assistant\n[[Lima<|im_end|>\n]]" in shown
    run_inprocess(common(checkpoints("llama"), tmp_path / "run", steps=1) + flags[2:] + ["--batch_size", "2",
                                                                                         "--seq_len", "128"])
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (recorded["prompt_format"], recorded["chat_template"]) == ("chat", "chatml")


def test_chat_template_from_a_file(tmp_path, tokenizer):
    """--chat_template naming a file renders with the file's template; a name that is neither a file nor a template
    is refused naming it, before anything loads."""
    template = tmp_path / "turns.jinja"
    template.write_text("{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}")
    rows, _ = data.prepare(cfg(write(tmp_path / "c.jsonl", CHAT), chat_template=str(template)),
                           builtin.make_tokenizer(), log=lambda *_: None)
    assert tokenizer.decode(rows[0]["input_ids"]) == ("<s>system: Be brief.</s><s>user: Capital of Peru?</s>"
                                                       "<s>assistant: Lima</s><s>user: And Chile?</s>"
                                                       "<s>assistant: Santiago</s>")
    assert trained_text(tokenizer, rows[0]) == "Lima</s>Santiago</s>"
    with pytest.raises(ValueError) as refusal:
        train.parse_config(["--chat_template", str(tmp_path / "missing.jinja")])
    assert str(refusal.value) == (f"--chat_template {tmp_path / 'missing.jinja'}: no such file, and not a Jinja "
                                  "template; pass 'chatml', a template, or a file holding one")


def test_a_template_that_never_marks_the_assistants_turn_is_refused(tmp_path, tokenizer):
    """A template that renders an assistant message as it renders a user's cannot tell responses from prompts: it is
    refused, named, before tokenizing."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}")
    with pytest.raises(data.DataError) as refusal:
        data.prepare(cfg(write(tmp_path / "c.jsonl", CHAT), chat_template=str(template)), builtin.make_tokenizer(),
                     log=lambda *_: None)
    assert str(refusal.value) == (f"--chat_template {template} never marks the assistant's turn: it renders an "
                                  "assistant message as it renders a user's, so responses cannot be told from prompts; "
                                  "pass a template that writes each message's role, such as --chat_template chatml")


# A ChatML template that opens with a default system turn where the conversation has none, as SmolLM2's does
DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nBe helpful.<|im_end|>\n' }}{% endif %}"
                  "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", [data.CHATML, DEFAULT_SYSTEM], ids=["chatml", "default_system"])
def test_a_conversation_opening_with_the_assistant_trains_its_turns(tokenizer, template):
    """A conversation whose first message is the assistant's (a greeting) renders as the template renders it, and
    trains on exactly its assistant turns: transformers renders no empty conversation to find where the first
    one begins."""
    tokenizer.chat_template = template
    messages = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima"}]
    row = data.tokenize({"messages": messages}, tokenizer, 256, "chat", "chat")
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_text(tokenizer, row) == "Hello!<|im_end|>\nLima<|im_end|>\n"


def test_system_prompt_on_chat_rows_is_refused(tmp_path, tokenizer):
    """--system_prompt is a system turn for alpaca and prompt_completion rows; chat rows carry theirs in their
    messages, and a run on them would train without the one asked for (SmolLM2's default instead): refused, named."""
    path = write(tmp_path / "c.jsonl", CHAT)
    with pytest.raises(data.DataError) as refusal:
        data.prepare(cfg(path, system_prompt="Be kind."), tokenizer, log=lambda *_: None)
    assert str(refusal.value) == (f"--system_prompt: {path} holds chat rows, whose system turn is among their "
                                  "messages; leave --system_prompt out, or give the rows a system message")
