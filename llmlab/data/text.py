"""Read a user's text file, refusing the mistakes that would otherwise give nonsense numbers."""

import json
from pathlib import Path

from llmlab.errors import LlmlabError


def read_text(path: str | Path) -> str:
    """The whole file as text; an error naming the file if it is missing, empty, binary or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise LlmlabError(f"data file not found: {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise LlmlabError(f"data file {path} is empty; give a file with text in it")
    if b"\x00" in raw[:65536]:
        raise LlmlabError(f"data file {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise LlmlabError(f"data file {path} is not UTF-8 text (bad byte at line {line}); "
                          "convert it with `iconv -t utf-8`") from None


def lines(text: str) -> list[str]:
    """The lines of a file's text, broken at "\n" (and "\r\n") only. `str.splitlines` also breaks at
    U+0085, U+2028, U+2029, form feeds and lone "\r", which real data holds inside its fields."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; errors name the line."""
    rows = []
    for number, line in enumerate(lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmlabError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LlmlabError(f"{path}:{number}: each line must be a JSON object, not {type(row).__name__}")
        rows.append((number, row))
    return rows
