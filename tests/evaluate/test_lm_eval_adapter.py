"""The lm-eval model "llmlab": its three request types equal lm-eval's HFLM on the same tiny model folder."""

import pytest
from lm_eval.api.instance import Instance

from llmlab.evaluate.lm_eval_adapter import LlmlabLM, arc_task
from llmlab.models import load_model, save_model
from tests.evaluate.test_arc import write_arc


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    save_model(*load_model("tiny-llama"), folder)
    return LlmlabLM(model=str(folder), batch_size=3), HFLM(pretrained=str(folder), device="cpu", dtype="float32",
                                                          batch_size=3), folder


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_equals_hflm(pair):
    ours, hflm, _ = pair
    long = "A long context. " * 40  # 640 bytes: cut from the left to the model's 512 positions, as HFLM does
    args = [("The cat sat on the", " mat"), ("The cat sat on the", " hat and more"), ("Trailing space ", "moves"),
            ("", "an empty context"), (long, " end"), ("The cat sat on the", " mat")]
    mine = ours.loglikelihood(requests("loglikelihood", args))
    theirs = hflm.loglikelihood(requests("loglikelihood", args))
    assert [m[0] for m in mine] == pytest.approx([t[0] for t in theirs], abs=1e-4)
    assert [m[1] for m in mine] == [t[1] for t in theirs]


def test_rolling_loglikelihood_equals_hflm(pair):
    ours, hflm, _ = pair
    texts = [("Perplexity of a short text.",), ("word " * 300,)]  # the second needs three windows of 512
    mine = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert mine == pytest.approx(hflm.loglikelihood_rolling(requests("loglikelihood_rolling", texts)), abs=1e-3)


def test_generate_until_equals_hflm(pair):
    ours, hflm, _ = pair
    args = [("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
            ("Q: 2 + 2?\nA:", {"until": ["Q:", "::::"], "max_gen_toks": 6}),
            ("Q: 3 + 3?", {"until": ["QQ"], "max_gen_toks": 5})]
    texts = ours.generate_until(requests("generate_until", args))
    assert texts[0] and not texts[1]  # the random model's reply: twelve tokens; cut at once by "::::"
    assert texts == hflm.generate_until(requests("generate_until", args))


def test_registered_model_runs_lm_evals_tasks(pair, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, hflm, folder = pair
    name = arc_task(tmp_path / "tasks", str(write_arc(tmp_path / "arc")), "easy", "test")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    ours = lm_eval.simple_evaluate(model="llmlab", model_args=f"model={folder},batch_size=2", tasks=[name],
                                   task_manager=tasks, bootstrap_iters=0)["results"][name]
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=[name], task_manager=tasks, bootstrap_iters=0)["results"][name]
    assert (ours["acc,none"], ours["acc_norm,none"]) == (theirs["acc,none"], theirs["acc_norm,none"])


def test_eval_harness_verb_runs_a_task_and_records_lm_evals_numbers(pair, tmp_path, capsys):
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from llmlab.cli import main
    from llmlab.runs import Registry

    _, hflm, folder = pair
    name = arc_task(tmp_path / "tasks", str(write_arc(tmp_path / "arc")), "easy", "test")
    assert main(["eval", "harness", "--model", str(folder), "--tasks", name, "--include-path",
                 str(tmp_path / "tasks"), "--batch-size", "2", "--out", "H", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=[name], task_manager=tasks, bootstrap_iters=0)["results"][name]
    assert summary["tasks"][name]["acc"] == theirs["acc,none"]
    assert summary["tasks"][name]["acc_norm"] == theirs["acc_norm,none"]
    assert (tmp_path / "H" / "results.json").is_file()
    assert Registry().get(summary["run"])["summary"]["tasks"][name]["acc"] == theirs["acc,none"]


@pytest.mark.parametrize("argv, message", [
    ([], "--tasks is required"),
    (["--tasks", "arc_easyy"], "unknown lm-eval task 'arc_easyy' (did you mean 'arc_easy'?)"),
])
def test_eval_harness_mistakes_are_one_line_errors(argv, message, capsys):
    from llmlab.cli import main

    assert main(["eval", "harness", "--model", "tiny-llama", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
