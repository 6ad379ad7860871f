"""Readers and writers for the data pipeline: text, JSON Lines, Parquet and HF datasets in; JSONL/Parquet shards out.

Input is cut into shards that workers take one at a time. A shard is a small JSON-able spec, so a killed
run plans the same shards again and can skip the finished ones:
    {"kind": "bytes", "path", "start", "end"}   a byte range of a .jsonl/.txt file, cut at line (or blank-line) ends
    {"kind": "files", "paths"}                  whole .txt files, one document each
    {"kind": "parquet", "path", "row_groups"}   some row groups of a Parquet file
    {"kind": "hf", "name", "split", "index", "num_shards"}   one contiguous slice of a datasets dataset
Rows that are not valid UTF-8 are counted (`invalid_utf8`) and skipped; every other malformed input is an
LlmlabError naming the file and line.
"""

import dataclasses
import glob
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal

from llmlab.atomic import atomic_write
from llmlab.config import field
from llmlab.errors import LlmlabError

EXTENSIONS = {".jsonl": "jsonl", ".txt": "txt", ".raw": "txt", ".parquet": "parquet"}
SEPARATORS = {"jsonl": b"\n", "line": b"\n", "paragraph": b"\n\n"}


def find_inputs(path: str, fmt: str) -> list[Path]:
    """The input files named by a file, a folder or a glob, sorted; errors for none, unreadable or all empty."""
    if any(c in path for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True))]
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if fmt != "auto" or p.suffix in EXTENSIONS)
    else:
        files = [Path(path)]
        if not files[0].exists():
            raise LlmlabError(f"input.path {path} does not exist; give a file, a folder or a glob like raw/*.jsonl")
    files = [p for p in files if p.is_file()]
    if not files:
        raise LlmlabError(f"input.path {path} matches no files; check the path or glob")
    for p in files:
        try:
            with _open(p) as f:
                f.read(1)
        except OSError as e:
            raise LlmlabError(f"cannot read input file {p}: {e.strerror or e}") from None
    if all(p.stat().st_size == 0 for p in files):
        raise LlmlabError(f"input.path {path}: all {len(files)} input file(s) are empty")
    return files


def _open(path: Path):
    return open(path, "rb")


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix not in EXTENSIONS:
        raise LlmlabError(f"cannot tell the format of {path} from its extension; set input.format "
                          f"(one of txt, jsonl, parquet, hf)")
    return EXTENSIONS[path.suffix]


def plan_shards(cfg) -> list[dict]:
    """Cut the input (an InputConfig) into shards of about cfg.shard_mb megabytes."""
    target = max(1, int(cfg.shard_mb * 2**20))
    if cfg.format == "hf":
        return _hf_shards(cfg, target)
    shards, small_txt = [], []
    for path in find_inputs(cfg.path, cfg.format):
        fmt = file_format(path, cfg.format)
        if fmt == "parquet":
            shards += _parquet_shards(path, target)
        elif fmt == "txt" and cfg.txt_unit == "file":
            small_txt.append(str(path))
        elif path.stat().st_size:
            sep = SEPARATORS["jsonl" if fmt == "jsonl" else cfg.txt_unit]
            shards += [{"kind": "bytes", "format": fmt, "path": str(path), "start": a, "end": b}
                       for a, b in _byte_ranges(path, target, sep)]
    for i in range(0, len(small_txt), 1000):  # whole-file documents: up to 1000 files per shard
        shards.append({"kind": "files", "paths": small_txt[i:i + 1000]})
    return shards


def _byte_ranges(path: Path, target: int, sep: bytes) -> list[tuple[int, int]]:
    """[start, end) ranges of about `target` bytes, each ending just after a separator (or at the end)."""
    size, cuts = path.stat().st_size, [0]
    with _open(path) as f:
        while cuts[-1] + target < size:
            f.seek(cuts[-1] + target)
            pos, buf = f.tell(), b""
            while sep not in buf and f.tell() < size:
                buf += f.read(1 << 16)
            at = buf.find(sep)
            cuts.append(size if at < 0 else pos + at + len(sep))
    if cuts[-1] < size:
        cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def _parquet_shards(path: Path, target: int) -> list[dict]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    groups, size, shards = [], 0, []
    for g in range(meta.num_row_groups):
        groups.append(g)
        size += meta.row_group(g).total_byte_size
        if size >= target or g == meta.num_row_groups - 1:
            shards.append({"kind": "parquet", "path": str(path), "row_groups": groups})
            groups, size = [], 0
    return shards


def _load_hf(name: str, split: str):
    import datasets

    try:
        if any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json")):  # save_to_disk folder
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; the message says what is wrong
        raise LlmlabError(f"cannot load dataset '{name}': {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise LlmlabError(f"dataset '{name}' has no split '{split}'; it has {', '.join(ds)}")
        ds = ds[split]
    return ds


def _hf_shards(cfg, target: int) -> list[dict]:
    ds = _load_hf(cfg.path, cfg.split)
    if len(ds) == 0:
        raise LlmlabError(f"dataset '{cfg.path}' split '{cfg.split}' is empty")
    n = min(len(ds), max(1, math.ceil(ds.data.nbytes / target)))
    return [{"kind": "hf", "name": cfg.path, "split": cfg.split, "index": i, "num_shards": n} for i in range(n)]


def read_shard(shard: dict, cfg, stats: Counter) -> Iterator[dict]:
    """Documents {"id", "text", ...other fields} of one shard; counts rows read and skipped in `stats`."""
    kind = shard["kind"]
    if kind == "bytes":
        yield from _read_bytes(shard, cfg, stats)
    elif kind == "files":
        for path in shard["paths"]:
            text = _decode(Path(path).read_bytes(), stats)
            if text is not None and text.strip():
                yield {"id": path, "text": text}
    elif kind == "parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(shard["path"])
        table = file.read_row_groups(shard["row_groups"])
        first = sum(file.metadata.row_group(g).num_rows for g in range(shard["row_groups"][0]))
        for i, row in enumerate(table.to_pylist()):
            yield _document(row, cfg, f"{shard['path']}:{first + i}", lambda: f"{shard['path']} row {first + i}", stats)
    else:
        ds = _load_hf(shard["name"], shard["split"]).shard(shard["num_shards"], shard["index"], contiguous=True)
        for i, row in enumerate(ds):
            yield _document(row, cfg, f"{shard['name']}:{shard['index']}:{i}", lambda: f"{shard['name']} row {i}", stats)


def _read_bytes(shard: dict, cfg, stats: Counter) -> Iterator[dict]:
    path, start = shard["path"], shard["start"]
    with _open(Path(path)) as f:
        f.seek(start)
        data = f.read(shard["end"] - start)
    sep = SEPARATORS["jsonl" if shard["format"] == "jsonl" else cfg.txt_unit]
    offset = start
    for raw in data.split(sep):
        here, offset = offset, offset + len(raw) + len(sep)
        if not raw.strip():
            continue
        text = _decode(raw, stats)
        if text is None:
            continue
        if shard["format"] == "txt":
            yield {"id": f"{path}@{here}", "text": text.strip("\r\n")}
            continue
        where = lambda: f"{path}:{_line_number(path, here)}"  # noqa: E731 (counted only when reporting)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmlabError(f"{where()}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise LlmlabError(f"{where()}: each line must be a JSON object, not {type(row).__name__}")
        doc = _document(row, cfg, f"{path}@{here}", where, stats)
        if doc is not None:
            yield doc


def _decode(raw: bytes, stats: Counter) -> str | None:
    stats["rows"] += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["invalid_utf8"] += 1
        return None


def _document(row: dict, cfg, default_id: str, where, stats: Counter) -> dict | None:
    """Rename the text field to "text" and give the row an id; a missing or non-text field is an error."""
    if cfg.text_key not in row:
        raise LlmlabError(f"{where()}: row has no field '{cfg.text_key}' (it has: {', '.join(map(str, row))}); "
                          "set input.text_key")
    text = row.pop(cfg.text_key)
    if not isinstance(text, str):
        raise LlmlabError(f"{where()}: field '{cfg.text_key}' is {type(text).__name__}, not text")
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates, which no writer accepts
    except UnicodeEncodeError:
        stats["invalid_utf8"] += 1
        return None
    doc_id = row.pop(cfg.id_key, None) if cfg.id_key else None
    return {"id": default_id if doc_id is None else str(doc_id), "text": text, **row}


def _line_number(path: str, offset: int) -> int:
    with _open(Path(path)) as f:
        return f.read(offset).count(b"\n") + 1


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Documents from a shard this pipeline wrote itself (trusted: no checks)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_docs(path: str | Path, docs: list[dict], fmt: str = "jsonl"):
    """One output shard, written atomically: JSON Lines, or Parquet with one column per field."""
    if fmt == "jsonl":
        atomic_write(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(docs), buf)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise LlmlabError(f"cannot write {path} as Parquet ({e}); a metadata field has mixed types, "
                          "use output.format jsonl") from None
    atomic_write(path, buf.getvalue())


def input_fingerprint(cfg) -> list:
    """What identifies the input for resuming: the options, and each file's size and modification time."""
    if cfg.format == "hf":
        return [cfg.path, cfg.split]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in find_inputs(cfg.path, cfg.format)]


@dataclasses.dataclass
class InputConfig:
    path: str = field("", help="input: a file, a folder, a glob such as raw/*.jsonl, or (format hf) a dataset")
    format: Literal["auto", "txt", "jsonl", "parquet", "hf"] = field("auto", help="auto: by file extension")
    text_key: str = field("text", help="the field that holds each document's text (jsonl, parquet, hf)")
    id_key: str = field("id", help="the field that holds a document id; rows without one get file@offset ids")
    txt_unit: Literal["file", "paragraph", "line"] = field("file", help="what one document is in a .txt file")
    split: str = field("train", help="the dataset split (format hf)")
    shard_mb: float = field(32.0, help="cut the input into shards of about this many MB")

    def __post_init__(self):
        if self.shard_mb <= 0:
            raise LlmlabError(f"input.shard_mb must be positive, got {self.shard_mb}")
