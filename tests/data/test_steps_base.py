"""`Filter` owns the loop and the drop accounting: a rule is `filter(doc) -> bool | (bool, reason)`."""

from dataclasses import dataclass

from llmlab import methods
from llmlab.data.pipeline import make_step
from llmlab.data.steps.base import Filter, StepLog, register


@dataclass
class ShortConfig:
    min_chars: int = 5


class Short(Filter):
    """Drop short documents; empty ones under a reason of their own."""
    name, Config = "too_short_test", ShortConfig

    def filter(self, doc):
        if not doc["text"]:
            return False, "empty"
        return len(doc["text"]) >= self.cfg.min_chars


def test_filter_keeps_true_and_counts_drops_by_reason():
    docs = [{"id": "a", "text": "long enough"}, {"id": "b", "text": "tiny"}, {"id": "c", "text": ""}]
    log = StepLog("too_short_test")
    kept = list(Short(ShortConfig()).process(iter(docs), log))
    assert [d["id"] for d in kept] == ["a"]
    assert dict(log.drops) == {"too_short_test": 1, "empty": 1}
    assert log.samples["empty"] == [docs[2]]


def test_register_makes_a_step_usable_by_name(monkeypatch):
    monkeypatch.setitem(methods.TABLE, "data", dict(methods.TABLE["data"]))
    register(Short)
    step = make_step("too_short_test", {"min_chars": 3})
    assert isinstance(step, Short) and step.cfg.min_chars == 3
    assert "language" in methods.names("data")  # llmlab's own steps come from the table
