"""Read a user's text file, refusing the mistakes that would otherwise give nonsense numbers."""

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
