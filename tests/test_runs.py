import dataclasses
import json

import pytest

from llmlab.atomic import atomic_write
from llmlab.errors import LlmlabError
from llmlab.runs import Registry, RunOptions, start_run


@dataclasses.dataclass
class Cfg:
    model: str = "tiny-llama"
    lr: float = 0.1


def test_run_folder_and_registry_row(tmp_path):
    opts = RunOptions(out=str(tmp_path / "r"), registry=str(tmp_path / "reg.sqlite"))
    with start_run("demo", Cfg(), opts) as run:
        run.log_metrics(step=1, loss=2.0)
        run.log_metrics(step=2, loss=1.5)
        summary = run.finish({"loss": 1.5})
    folder = tmp_path / "r"
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "log.txt"}
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines] == [2.0, 1.5]
    assert json.loads((folder / "summary.json").read_text()) == summary
    row = Registry(opts.registry).get("r")
    assert row["status"] == "finished" and row["summary"]["loss"] == 1.5 and row["config"]["lr"] == 0.1


def test_failed_run_is_marked_and_default_names_do_not_collide(tmp_path):
    registry = str(tmp_path / "reg.sqlite")
    with pytest.raises(RuntimeError):
        with start_run("demo", Cfg(), RunOptions(name="x", registry=registry)):
            raise RuntimeError("boom")
    assert Registry(registry).get("x")["status"] == "failed"
    with start_run("demo", Cfg(), RunOptions(name="x", registry=registry)) as again:
        again.finish({})
    assert again.path.name == "x-2"  # the failed run's folder is kept


def test_unknown_run_name_suggests_the_closest(tmp_path):
    registry = str(tmp_path / "reg.sqlite")
    with start_run("demo", Cfg(), RunOptions(name="alpha", registry=registry)) as run:
        run.finish({})
    with pytest.raises(LlmlabError, match="did you mean 'alpha'"):
        Registry(registry).get("alpah")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    with pytest.raises(TypeError):
        atomic_write(path, 123)  # not str/bytes: fails mid-write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    import os

    atomic_write(tmp_path / "f.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
