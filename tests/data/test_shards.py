import json

import numpy as np
import pytest

from llmlab.data.readers import InputConfig
from llmlab.data.shards import TokenShards, choose_dtype, pack_ids, pack_texts
from llmlab.errors import LlmlabError
from llmlab.runs import RunOptions
from llmlab.stages.data import PackConfig, pack_verb

EOS = 9
DOCS = [[1, 2, 3], [4], [5, 6, 7, 8, 1, 2], [], [3, 3]]
STREAM = [1, 2, 3, 9, 4, 9, 5, 6, 7, 8, 1, 2, 9, 9, 3, 3, 9]


def _read_all(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [np.fromfile(folder / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"]]
    return manifest, parts


def test_round_trip_with_eos_after_each_document(tmp_path):
    manifest = pack_ids(DOCS, tmp_path / "tok", eos_id=EOS, vocab_size=10, shard_tokens=5, tokenizer="toy")
    got, parts = _read_all(tmp_path / "tok")
    assert got == manifest
    assert [len(p) for p in parts] == [5, 5, 5, 2] and [s["tokens"] for s in manifest["shards"]] == [5, 5, 5, 2]
    stream = np.concatenate(parts)
    assert stream.tolist() == STREAM
    assert np.flatnonzero(stream == EOS).tolist() == (np.cumsum([len(d) + 1 for d in DOCS]) - 1).tolist()
    assert (manifest["dtype"], manifest["eos_id"], manifest["total_tokens"], manifest["documents"]) == \
        ("uint16", EOS, 17, 5)
    assert parts[0].dtype == np.uint16 and (tmp_path / "tok" / "shard_00000.bin").stat().st_size == 10


def test_dtype_follows_the_vocabulary(tmp_path):
    assert choose_dtype(65536) == np.uint16 and choose_dtype(65537) == np.uint32
    manifest = pack_ids([[70000, 1]], tmp_path / "big", eos_id=2, vocab_size=70001)
    assert manifest["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "big" / "shard_00000.bin", dtype=np.uint32).tolist() == [70000, 1, 2]
    with pytest.raises(LlmlabError, match="uint16 cannot hold"):
        pack_ids([[1]], tmp_path / "x", eos_id=2, vocab_size=70001, dtype="uint16")
    with pytest.raises(LlmlabError, match="outside the vocabulary"):
        pack_ids([[1, 10]], tmp_path / "y", eos_id=2, vocab_size=10)


def test_crash_midway_leaves_no_folder_and_no_manifest(tmp_path):
    def docs():
        for i in range(100):
            if i == 50:
                raise RuntimeError("killed")
            yield [1, 2, 3]

    with pytest.raises(RuntimeError):
        pack_ids(docs(), tmp_path / "tok", eos_id=0, vocab_size=10, shard_tokens=8)
    assert list(tmp_path.iterdir()) == []                 # no shards, no manifest, no temporary folder
    with pytest.raises(LlmlabError, match="no manifest.json"):
        TokenShards(tmp_path / "tok", seq_len=4)


def test_token_shards_windows_are_views(tmp_path):
    pack_ids(DOCS, tmp_path / "tok", eos_id=EOS, vocab_size=10, shard_tokens=5)
    data = TokenShards(tmp_path / "tok", seq_len=2)
    assert len(data) == 2 + 2 + 2 + 0                     # (5 - 1) // 2 per full shard, none in a 2-token one
    assert data[0].tolist() == STREAM[0:3] and data[1].tolist() == STREAM[2:5] and data[2].tolist() == STREAM[5:8]
    assert data[-1].tolist() == STREAM[12:15]
    window = data[3]
    assert isinstance(window.base, np.memmap) or isinstance(window, np.memmap)
    assert np.shares_memory(window, data.shard(1)) and not window.flags.writeable
    batch = data.batch([0, 5])
    assert batch.dtype == np.int64 and batch.tolist() == [STREAM[0:3], STREAM[12:15]]
    with pytest.raises(IndexError):
        data[6]


def test_pack_texts_and_the_verb(tmp_path):
    from llmlab.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    texts = ["héllo", "wörld", "你好"]
    manifest = pack_texts(texts, tok, tmp_path / "tok", shard_tokens=8, name="bytes")
    stream = np.concatenate(_read_all(tmp_path / "tok")[1]).tolist()
    pieces = " ".join(tok.decode(stream, skip_special_tokens=False).split(tok.eos_token)).split()
    assert pieces == texts and manifest["eos_id"] == tok.eos_token_id
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 20), encoding="utf-8")
    cfg = PackConfig(input=InputConfig(path=str(corpus)), tokenizer="tiny-llama", shard_tokens=100)
    summary = pack_verb(cfg, RunOptions(out=str(tmp_path / "run")))
    assert summary["documents"] == 60 and summary["total_tokens"] == 20 * (6 + 6 + 6 + 3) and summary["shards"] == 5
    data = TokenShards(tmp_path / "run", seq_len=16)      # the run folder finds its tokens/ folder
    assert len(data) == 4 * (99 // 16) + (420 - 400 - 1) // 16
    with pytest.raises(LlmlabError, match="--tokenizer is required"):
        PackConfig(input=InputConfig(path=str(corpus)))


def test_cli_smoke(tmp_path, monkeypatch, capsys):
    from llmlab import cli

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(10)), encoding="utf-8")
    code = cli.main(["data", "pack", "--input.path", str(corpus), "--input.text-key", "body",
                     "--tokenizer", "tiny-gpt2", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["documents"] == 10 and summary["dtype"] == "uint16"
    assert cli.main(["data", "pack", "--input.path", str(corpus)]) == 2
    assert "--tokenizer is required" in capsys.readouterr().err
