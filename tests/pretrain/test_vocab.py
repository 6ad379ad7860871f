"""Vocabulary extension (Chinese-LLaMA's recipe) on a tiny model with a byte tokenizer: new pieces are whole
Chinese words, their embeddings start as the mean of the old pieces, old ids and old predictions do not move."""

import torch

from llmlab.cli import main
from llmlab.data.tokenizer_train import train_tokenizer
from llmlab.models import load_model
from llmlab.pretrain.vocab import extend_vocabulary, is_chinese, new_pieces, tokens_per_char

ZH = ["我们今天去学校学习中文。", "他们在北京工作，我们在上海学习。", "学习中文很有意思，我们喜欢学习。"] * 20


def test_extension_adds_whole_chinese_pieces_initialised_as_the_mean_of_their_bytes():
    model, tok = load_model("tiny-llama")
    language = train_tokenizer(ZH, "bpe", vocab_size=400, special_tokens=["<|endoftext|>"])
    pieces = new_pieces(tok, language, keep=is_chinese)
    assert pieces and all(is_chinese(p) for p in pieces) and "学习" in pieces
    english = tok("plain English text", add_special_tokens=False)["input_ids"]
    old_rows = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        old_logits = model(torch.tensor([english])).logits
    before, base = tokens_per_char(tok, ZH[:3]), len(tok)
    byte_ids = tok("学习", add_special_tokens=False)["input_ids"]
    added = extend_vocabulary(model, tok, pieces)
    assert added == len(pieces) and len(tok) == base + added
    assert tokens_per_char(tok, ZH[:3]) < before / 2  # three byte tokens per character before
    new = tok.convert_tokens_to_ids("学习")
    assert new >= base and len(byte_ids) == 6
    assert torch.allclose(model.get_input_embeddings().weight[new], old_rows[byte_ids].mean(0))
    assert tok("plain English text", add_special_tokens=False)["input_ids"] == english
    assert tok.decode(tok(ZH[1], add_special_tokens=False)["input_ids"]) == ZH[1]
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([english])).logits[..., :base], old_logits[..., :base], atol=1e-6)


def test_pretrain_extends_the_vocabulary_and_continues(tmp_path):
    language = train_tokenizer(ZH, "bpe", vocab_size=400, special_tokens=["<|endoftext|>"])
    language.save_pretrained(tmp_path / "zh")
    (tmp_path / "zh.txt").write_text("\n".join(ZH), encoding="utf-8")
    code = main(["pretrain", "--model", "tiny-llama", "--extend-vocab", str(tmp_path / "zh"), "--data",
                 str(tmp_path / "zh.txt"), "--seq-len", "16", "--train.max-steps", "3", "--train.batch-size", "2",
                 "--eval-fraction", "0.2", "--out", str(tmp_path / "run")])
    assert code == 0
    model, tok = load_model(str(tmp_path / "run"))
    assert len(tok) > 259 and model.get_input_embeddings().num_embeddings >= len(tok)
    assert tok.convert_tokens_to_ids("学习") >= 259  # 256 bytes + 3 specials before
