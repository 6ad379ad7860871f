"""What the benchmark scripts share: run an `llmlab` command in-process and read its JSON summary."""

import contextlib
import io
import json

from llmlab.cli import main as llmlab


def run(argv: list[str]) -> dict:
    """The summary `llmlab … --json` prints on its last line; the command's other output is swallowed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert llmlab([*argv, "--json"]) == 0, argv
    return json.loads(out.getvalue().strip().splitlines()[-1])
