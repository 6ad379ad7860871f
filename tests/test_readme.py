"""The README's set-up commands stay true: CI runs exactly the test command it shows."""

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.index("## ")]  # the commands sit above the first section
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                  if line.strip() and not line.startswith(("#", "set ", "cd "))][-1]
    assert ci_command in head
    assert ".venv/bin/llmlab demo" in head


def test_every_stage_in_the_cli_table_is_documented():
    from llmlab.cli import STAGES

    readme = (ROOT / "README.md").read_text()
    assert all(f"llmlab {verb}" in readme for verb in STAGES if verb != "demo")
