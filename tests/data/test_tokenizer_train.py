import json
import random

import pytest

from llmlab.data.readers import InputConfig
from llmlab.data.shards import load_tokenizer
from llmlab.data.tasks import words
from llmlab.data.tokenizer_train import bytes_per_token, train_tokenizer
from llmlab.errors import LlmlabError
from llmlab.runs import RunOptions
from llmlab.stages.data import TokenizerConfig, tokenizer_verb

HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你说年"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(seed=0, n=300):
    rng, vocab = random.Random(seed), words()[:300]
    english = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 15))).capitalize() + "." for _ in range(n)]
    chinese = ["".join(rng.choice(HANZI) for _ in range(rng.randint(8, 20))) + "。" for _ in range(n // 2)]
    return english, chinese


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_train_save_and_load_with_auto_tokenizer(kind, tmp_path):
    from transformers import AutoTokenizer

    english, chinese = _corpus()
    tok = train_tokenizer(english + chinese, kind, vocab_size=400, special_tokens=SPECIALS)
    tok.save_pretrained(tmp_path / kind)
    loaded = AutoTokenizer.from_pretrained(tmp_path / kind)
    assert len(loaded) == len(tok) <= 400
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token_id == loaded.eos_token_id == 0
    assert loaded.convert_tokens_to_ids(SPECIALS) == [0, 1, 2]
    text = english[0] + " " + chinese[0]
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    decoded = loaded.decode(ids)
    assert (decoded.replace(" ", "") == text.replace(" ", "")) if kind == "wordpiece" else decoded == text
    assert len(ids) < len(text.encode("utf-8")) / 1.5                  # it learned merges
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    assert type(load_tokenizer(str(tmp_path / kind))).__name__ == type(loaded).__name__


def test_character_tokenizer_has_one_token_per_character_seen(tmp_path):
    from transformers import AutoTokenizer

    english, chinese = _corpus()
    tok = train_tokenizer(english + chinese, "chars", special_tokens=["<|endoftext|>"])
    tok.save_pretrained(tmp_path / "chars")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "chars")
    alphabet = set("".join(english + chinese))
    assert len(loaded) == len(alphabet) + 2  # + end-of-text and <unk>
    text = english[1] + chinese[1]
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and loaded.decode(ids) == text
    assert loaded("Ω", add_special_tokens=False)["input_ids"] == [loaded.unk_token_id]


def test_bytes_per_token():
    from llmlab.models.tiny import byte_tokenizer

    english, chinese = _corpus(1, 50)
    assert bytes_per_token(byte_tokenizer(), english + chinese) == 1.0   # one token per byte, exactly
    bpe = train_tokenizer(_corpus()[0], "bpe", vocab_size=500)
    assert bytes_per_token(bpe, english) > 2.0
    assert bytes_per_token(bpe, chinese) < 1.2                           # never saw Chinese: ~ bytes
    with pytest.raises(LlmlabError, match="empty"):
        bytes_per_token(bpe, [""])


def test_unigram_vocabulary_smaller_than_the_alphabet_is_a_clear_error():
    with pytest.raises(LlmlabError, match="raise --vocab-size"):
        train_tokenizer(["".join(chr(0x4E00 + i) for i in range(300))], "unigram", vocab_size=100)


def test_tokenizer_verb(tmp_path, capsys):
    english, chinese = _corpus()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in english + chinese), encoding="utf-8")
    (tmp_path / "en.txt").write_text("\n".join(_corpus(5, 40)[0]), encoding="utf-8")
    (tmp_path / "zh.json").write_text(json.dumps([{"output": t} for t in _corpus(5, 40)[1]]), encoding="utf-8")
    cfg = TokenizerConfig(input=InputConfig(path=str(corpus)), kinds=["bpe", "unigram"], vocab_size=400,
                          heldout=[{"name": "en", "path": str(tmp_path / "en.txt")},
                                   {"name": "zh", "path": str(tmp_path / "zh.json"), "fields": "output"}])
    summary = tokenizer_verb(cfg, RunOptions(out=str(tmp_path / "run")))
    assert set(summary["bytes_per_token"]) == {"bpe", "unigram"}
    assert all(summary["bytes_per_token"][k][lang] > 1.5 for k in ("bpe", "unigram") for lang in ("en", "zh"))
    assert (tmp_path / "run" / "tokenizer-bpe" / "tokenizer.json").is_file()
    out = capsys.readouterr().out
    assert "bpe bytes/token" in out and "unigram bytes/token" in out and "\nzh " in out
    with pytest.raises(LlmlabError, match="--kinds"):
        TokenizerConfig(input=InputConfig(path=str(corpus)), kinds=["sentencepiece"])


def test_cli_smoke(tmp_path, monkeypatch, capsys):
    from llmlab import cli

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(_corpus(0, 100)[0]), encoding="utf-8")
    code = cli.main(["data", "tokenizer", "--input.path", str(corpus), "--input.txt-unit", "paragraph",
                     "--kinds", "bpe,wordpiece", "--vocab-size", "350", "--out", str(tmp_path / "run")])
    assert code == 0 and "wordpiece: 350 tokens" in capsys.readouterr().out
    assert cli.main(["data", "tokenizer", "--input.path", str(corpus), "--kinds", "bpee"]) == 2
    assert "--kinds must name tokenizers" in capsys.readouterr().err
