"""Reports: runs linked to the runs that made their models, the table, the plots and the pages."""

import json

import pytest

from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.evaluate.report import build_report, gather, row_values
from llmlab.runs import Registry, Run


def _run(verb, config, summary, metrics=(), name=None):
    with Run(verb, config, name=name) as run:
        for m in metrics:
            run.log_metrics(**m)
        run.finish(summary)
    return run


@pytest.fixture
def registry(tmp_path):
    """A float model, three quantized ones with their perplexities, a training run, an MC eval."""
    _run("eval ppl", {"model": "smollm2-135m"}, {"ppl": 20.0, "tokens_per_s": 900.0}, name="ppl-fp")
    for bits, ppl in [(8, 20.1), (4, 21.5), (3, 30.0)]:
        out = tmp_path / f"q{bits}"
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"\0" * (bits * 1000))
        _run("quantize", {"model": "smollm2-135m", "method": "gptq", "bits": bits, "out": str(out)},
             {"size_bytes": bits * 1000}, name=f"gptq-{bits}")
        _run("eval ppl", {"model": str(out)}, {"ppl": ppl}, name=f"ppl-gptq-{bits}")
    _run("finetune", {"model": "tiny-llama", "method": "lora"}, {"train_loss": 1.0},
         metrics=[{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.9}], name="ft")
    _run("eval mmlu", {"model": "smollm2-135m"}, {"acc": 0.3, "subjects": {"anatomy": {"acc": 0.25}, "law": 0.4}},
         name="mmlu")
    return Registry()


def test_eval_runs_are_linked_to_the_run_that_made_their_model(registry):
    rows = {r["name"]: r for r in gather(registry, [])}
    assert rows["ppl-gptq-4"]["producer"]["name"] == "gptq-4"
    assert rows["ppl-fp"]["producer"] is None
    values = row_values(rows["ppl-gptq-4"])
    assert (values["bits"], values["method"], values["ppl"]) == (4, "gptq", 21.5)
    assert values["size MB"] == pytest.approx(4000 / 2**20)  # measured on disk: the eval summary has no size
    assert row_values(rows["mmlu"])["accuracy"] == 0.3


def test_report_writes_table_plots_and_a_self_contained_page(registry, tmp_path):
    folder = tmp_path / "report"
    written = build_report(gather(registry, []), folder, "compare")
    assert set(written["plots"]) == {"ppl_vs_bits.png", "loss_curves.png", "subjects.png"}
    for plot in written["plots"]:
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>ppl-gptq-3</td>" in page
    md = (folder / "report.md").read_text()
    assert "| ppl-gptq-3 | eval ppl |" in md and "![ppl_vs_bits](ppl_vs_bits.png)" in md
    table = {row["run"]: row for row in json.loads((folder / "table.json").read_text())}
    assert table["ppl-gptq-3"]["ppl"] == "30" and table["ppl-gptq-3"]["bits"] == "3"


def test_named_runs_and_verb_filter(registry):
    assert [r["name"] for r in gather(registry, ["ft", "mmlu"])] == ["ft", "mmlu"]
    assert {r["name"] for r in gather(registry, [], verb="quantize")} == {"gptq-8", "gptq-4", "gptq-3"}
    with pytest.raises(LlmlabError, match="no runs to report"):
        gather(registry, [], verb="prune")


def test_report_verb(registry, capsys):
    assert main(["report", "ppl-fp", "ppl-gptq-4", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["runs"] == ["ppl-fp", "ppl-gptq-4"] and summary["plots"] == ["ppl_vs_bits.png"]


def test_report_with_an_empty_registry_is_a_one_line_error(capsys):
    assert main(["report"]) == 2
    assert "no runs to report" in capsys.readouterr().err


def test_pruned_models_are_not_float_baselines_and_producers_fold_into_their_evaluations(tmp_path):
    from llmlab.evaluate.report import float_baselines

    _run("eval ppl", {"model": "smollm2-135m"}, {"ppl": 20.0, "tokens_per_s": 900.0}, name="ppl-fp")
    pruned = tmp_path / "w50"
    pruned.mkdir()
    (pruned / "model.safetensors").write_bytes(b"\0" * 2000)
    _run("prune", {"model": "smollm2-135m", "method": "wanda", "sparsity": 0.5, "out": str(pruned)},
         {"params": 100, "nonzero_params": 50}, name="wanda-50")
    _run("eval ppl", {"model": str(pruned)}, {"ppl": 504.0, "tokens_per_s": 800.0}, name="ppl-wanda")
    _run("finetune", {"model": "tiny-llama", "method": "lora"}, {"train_loss": 1.0, "tokens_per_s": 1000.0},
         name="ft")
    rows = gather(Registry(), [])
    valued = [(r, row_values(r)) for r in rows]
    assert float_baselines(valued) == [("ppl-fp", 20.0)]  # the pruned model's 504 is no float baseline
    written = build_report(rows, tmp_path / "report")
    table = {row["run"]: row for row in json.loads((tmp_path / "report" / "table.json").read_text())}
    assert "wanda-50" not in table  # folded into the evaluation of the model it made
    assert (table["ppl-wanda"]["sparsity"], table["ppl-wanda"]["params"], table["ppl-wanda"]["method"]) == (
        "0.5", "50", "wanda")  # nonzero parameters, not the dense count
    assert table["ppl-wanda"]["size MB"] != "-"
    assert (table["ppl-fp"]["eval tok/s"], table["ppl-fp"]["train tok/s"]) == ("900", "-")
    assert (table["ft"]["train tok/s"], table["ft"]["eval tok/s"]) == ("1,000", "-")
    assert "wanda-50" in written["runs"]
