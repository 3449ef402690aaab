"""Tokenization and batching: the loss sees response tokens only, and long prompts never cost the response."""
import json

import pytest

import data


@pytest.fixture(scope="module")
def tokenizer():
    return data.builtin_tokenizer()


def test_labels_mask_exactly_prompt_and_padding(tokenizer):
    examples = [{"instruction": "Name the capital.", "input": "Peru", "output": "Lima"},
                {"instruction": "Give the opposite of this long word.", "output": "a much longer answer here"}]
    rows = [data.tokenize(ex, tokenizer, seq_len=64) for ex in examples]
    batch = data.collate(rows, tokenizer.pad_token_id)
    for i, ex in enumerate(examples):
        prompt, response = data.render(ex)
        n_prompt = 1 + len(tokenizer.encode(prompt, add_special_tokens=False))  # BOS + prompt
        n_resp = len(tokenizer.encode(response, add_special_tokens=False)) + 1  # response + EOS
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert (labels[:n_prompt] == data.IGNORE).all()
        assert labels[n_prompt:n_prompt + n_resp].tolist() == ids[n_prompt:n_prompt + n_resp].tolist()
        assert (labels[n_prompt:n_prompt + n_resp] != data.IGNORE).all()
        assert (labels[n_prompt + n_resp:] == data.IGNORE).all() and (mask[n_prompt + n_resp:] == 0).all()
        assert tokenizer.decode(ids[n_prompt:n_prompt + n_resp - 1]) == response


def test_train_on_prompt_labels_everything(tokenizer):
    row = data.tokenize({"instruction": "Name the capital.", "input": "Peru", "output": "Lima"}, tokenizer, 64,
                        train_on_prompt=True)
    assert row.labels == row.input_ids


def test_long_prompt_is_cut_before_the_response(tokenizer):
    ex = {"instruction": "word " * 200, "output": "the answer stays"}
    row = data.tokenize(ex, tokenizer, seq_len=32)
    assert len(row.input_ids) == 32 and row.input_ids[0] == tokenizer.bos_token_id
    response = tokenizer.encode("the answer stays", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert row.input_ids[-len(response):] == response and row.labels[-len(response):] == response
    assert tokenizer.decode(row.input_ids[1:-len(response)]).endswith("### Response:\n")


def test_builtin_tokenizer_round_trips_any_text(tokenizer):
    text = "Hello, world!\n  Tabs\tare unknown but spaces and 123 survive."
    ids = tokenizer.encode(text.replace("\t", " "), add_special_tokens=False)
    assert tokenizer.decode(ids) == text.replace("\t", " ")


def test_jsonl_text_and_alpaca_records(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "plain"}) + "\n\n" + json.dumps({"instruction": "i", "output": "o"}) + "\n")
    assert data.load_examples(str(f)) == [{"text": "plain"}, {"instruction": "i", "output": "o"}]


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.jsonl", "no such file"),
    ("a,b\n", "d.csv", "unsupported extension"),
    ("", "d.jsonl", "no examples"),
    ('{"question": "q", "answer": "a"}\n', "d.jsonl", r"record 0 has fields \['answer', 'question'\]"),
    ("{not json\n", "d.jsonl", "d.jsonl:1 is not valid JSON"),
])
def test_bad_dataset_errors(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_examples(str(path))


def test_ranks_see_disjoint_data(tokenizer):
    rows = [data.tokenize({"text": f"row {i}"}, tokenizer, 16) for i in range(16)]
    seen = []
    for rank in range(2):
        loader = data.build_loader(rows, 4, tokenizer.pad_token_id, rank, 2, seed=0)
        seen.append({tuple(r.tolist()) for b in loader for r in b["input_ids"]})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16
