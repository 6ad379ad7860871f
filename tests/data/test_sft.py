"""SFT data: formats, chat rendering, response-only labels, truncation, and clear errors for bad input."""

import json

import pytest

from llmlab.data.packing import IGNORE
from llmlab.data.sft import chat_template, encode_chat, load_sft_data, read_rows
from llmlab.errors import LlmlabError
from llmlab.models.tiny import byte_tokenizer

END = "<|im_end|>"  # the tiny tokenizer's EOS and ChatML's end of turn


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _targets(tok, example) -> str:
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4, of course."}]


@pytest.mark.parametrize("template", ["auto", "alpaca"])
def test_only_assistant_replies_and_their_end_token_are_learned(tok, template):
    ids, labels = encode_chat(CONVERSATION, tok, chat_template(tok, template))
    kept = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tok.decode(kept) == f"Hello!{END}4, of course.{END}"
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    # two separate runs of labels, one per reply: the user turn between them is masked
    starts = [t for t in range(len(labels)) if labels[t] != IGNORE and (t == 0 or labels[t - 1] == IGNORE)]
    assert len(starts) == 2
    assert tok.decode(ids[starts[0]:starts[0] + len(tok("Hello!")["input_ids"]) + 1]) == f"Hello!{END}"


def test_formats_are_detected_and_rendered_alike(tmp_path, tok):
    reply = {"alpaca": {"instruction": "Add", "input": "2 and 2", "output": "4"},
             "messages": {"messages": [{"role": "user", "content": "Add\n\n2 and 2"},
                                       {"role": "assistant", "content": "4"}]},
             "sharegpt": {"conversations": [{"from": "human", "value": "Add\n\n2 and 2"},
                                            {"from": "gpt", "value": "4"}]}}
    rendered = set()
    for fmt, row in reply.items():
        data = load_sft_data(_jsonl(tmp_path / f"{fmt}.jsonl", [row]), tok)
        assert data.stats["format"] == fmt
        (ex,) = data.train
        assert _targets(tok, ex) == f"4{END}"
        rendered.add(tok.decode(ex["input_ids"]))
    assert rendered == {f"<|im_start|>user\nAdd\n\n2 and 2{END}\n<|im_start|>assistant\n4{END}\n"}


def test_text_format_learns_every_token_and_csv_and_parquet_read(tmp_path, tok):
    data = load_sft_data(_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}]), tok)
    (ex,) = data.train
    assert tok.decode(ex["input_ids"]) == f"plain words{END}"  # EOS appended; the tiny tokenizer adds no BOS
    assert ex["labels"][0] == IGNORE and ex["labels"][1:] == ex["input_ids"][1:]
    (tmp_path / "a.csv").write_text("instruction,input,output\nSay hi,,hi\n")
    assert _targets(tok, load_sft_data(str(tmp_path / "a.csv"), tok).train[0]) == f"hi{END}"
    import datasets
    datasets.Dataset.from_list([{"instruction": "Say yo", "output": "yo"}]).to_parquet(str(tmp_path / "a.parquet"))
    assert _targets(tok, load_sft_data(str(tmp_path / "a.parquet"), tok).train[0]) == f"yo{END}"


def test_truncation_is_counted_and_rows_without_response_left_are_dropped(tmp_path, tok):
    rows = [{"instruction": "q", "output": "short"},
            {"instruction": "q", "output": "a much longer answer " * 3},
            {"instruction": "a very long question " * 5, "output": "gone"}]
    data = load_sft_data(_jsonl(tmp_path / "d.jsonl", rows), tok, max_len=48)
    assert data.stats["truncated"] == 2 and data.stats["dropped"] == 1 and data.stats["examples"] == 2
    assert all(len(e["input_ids"]) <= 48 for e in data.train)


def test_eval_fraction_splits_rows_deterministically(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    a = load_sft_data(path, tok, eval_fraction=0.2, seed=3)
    b = load_sft_data(path, tok, eval_fraction=0.2, seed=3)
    assert len(a.train) == 8 and len(a.eval) == 2 and a.eval == b.eval
    held = load_sft_data(path, tok, eval_data=path)
    assert len(held.train) == len(held.eval) == 10


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"d.jsonl row 2: missing field 'output'"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}],
     r"row 1, messages\[1\]: field 'role' must be system, user, assistant or tool, got 'bot'"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}],
     r"row 1, conversations\[1\]: missing field 'value'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1: the conversation has no assistant turn"),
    ([{"prompt": "a", "completion": "b"}], "row 1: cannot tell the data format from its fields"),
])
def test_bad_rows_name_the_file_row_and_field(tmp_path, tok, rows, message):
    with pytest.raises(LlmlabError, match=message):
        load_sft_data(_jsonl(tmp_path / "d.jsonl", rows), tok)


def test_bad_files_and_sources_are_clear_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LlmlabError, match="empty.jsonl is empty"):
        read_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(LlmlabError, match="could not read data file .*bad.jsonl: JSON parse error"):
        read_rows(str(tmp_path / "bad.jsonl"))
    with pytest.raises(LlmlabError, match="data file not found: nope.jsonl"):
        read_rows("nope.jsonl")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(LlmlabError, match="must end in .json, .jsonl, .csv, .parquet"):
        read_rows(str(tmp_path / "rows.txt"))
    with pytest.raises(LlmlabError, match="could not load dataset 'someone/some-data' from the Hugging Face hub"):
        read_rows("someone/some-data")  # tests run with HF_HUB_OFFLINE=1


def test_no_chat_template_suggests_the_built_in_one(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = None
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    with pytest.raises(LlmlabError, match="no chat template.*use --template alpaca"):
        load_sft_data(path, tok)
    (ex,) = load_sft_data(path, tok, template="alpaca").train
    assert tok.decode(ex["input_ids"]).endswith(f"### Instruction:\nSay hi\n\n### Response:\nhi{END}\n\n")
    assert _targets(tok, ex) == f"hi{END}"
    # plain text needs no template at all
    assert load_sft_data(_jsonl(tmp_path / "t.jsonl", [{"text": "x y"}]), tok).train


def test_read_jsonl_breaks_lines_at_newlines_only(tmp_path):
    from llmlab.data.text import read_jsonl

    rows = [{"text": "a\u2028b\x0cc\u0085d\re"}, {"text": "second"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert [r for _, r in read_jsonl(path)] == rows
