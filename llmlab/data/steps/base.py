"""What a pipeline step is: `Step` (a stream of documents in, the kept ones out) and `Filter`, the
base of every keep-or-drop rule, which owns the loop and the drop accounting the way datatrove's
`BaseFilter` does, so a rule is one function:

    class Language(Filter):
        def filter(self, doc) -> bool | tuple[bool, str]:   # (False, reason) to drop with a reason
            ...

Steps are listed by name in `llmlab.methods` (family "data"); `register` adds one of your own.
"""

from collections import Counter
from typing import ClassVar, Iterator

from llmlab.methods import register_step

SAMPLES_PER_REASON = 20  # dropped examples kept per (step, reason) for inspection


class Step:
    """One pipeline step. Subclasses set `name` (the YAML key) and `Config` (a dataclass, validated in
    __post_init__) and implement process(). Per-document steps are mapped over shards in parallel workers;
    steps with `global_ = True` (de-duplication, decontamination fitting) see the whole corpus in one process."""
    name: ClassVar[str]
    Config: ClassVar[type]
    global_: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg = cfg

    def process(self, docs: Iterator[dict], log: "StepLog") -> Iterator[dict]:
        """Yield the kept (possibly modified) documents; call log.drop(doc, reason) for the others."""
        raise NotImplementedError


class StepLog:
    """What one step did to one shard (or to the whole corpus): drops per reason with samples, modifications."""

    def __init__(self, step: str, keep: int = SAMPLES_PER_REASON):
        self.step, self.keep = step, keep
        self.drops: Counter = Counter()        # reason -> documents dropped
        self.drop_bytes: Counter = Counter()   # reason -> UTF-8 bytes of their text
        self.samples: dict[str, list[dict]] = {}
        self.changes: Counter = Counter()      # what -> count, e.g. {"EMAIL": 12}

    def drop(self, doc: dict, reason: str) -> None:
        """Count the drop under `reason` and keep a sample for inspection."""
        self.drops[reason] += 1
        self.drop_bytes[reason] += len(doc.get("text", "").encode("utf-8"))
        kept = self.samples.setdefault(reason, [])
        if len(kept) < self.keep:
            kept.append(doc)

    def modified(self, doc: dict, what: str, n: int = 1) -> None:
        """Count `n` changes of kind `what` made to `doc` (e.g. redactions by type)."""
        self.changes[what] += n

    def merge(self, other: "StepLog") -> "StepLog":
        """Add another shard's log into this one (samples stay capped)."""
        self.drops.update(other.drops)
        self.drop_bytes.update(other.drop_bytes)
        self.changes.update(other.changes)
        for reason, docs in other.samples.items():
            kept = self.samples.setdefault(reason, [])
            kept.extend(docs[:self.keep - len(kept)])
        return self

    def to_dict(self) -> dict:
        return {"step": self.step, "drops": dict(self.drops), "drop_bytes": dict(self.drop_bytes),
                "changes": dict(self.changes), "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict) -> "StepLog":
        log = cls(data["step"])
        log.drops.update(data["drops"])
        log.drop_bytes.update(data["drop_bytes"])
        log.changes.update(data["changes"])
        log.samples = {k: list(v) for k, v in data["samples"].items()}
        return log


class Filter(Step):
    """A per-document rule: keep a document when `filter(doc)` is true, else drop it under a reason.

    `filter` may change the document (tag it with a score) before deciding. It returns True/False,
    or (False, reason) to count the drop under a reason of its own (default: the step's name)."""

    def filter(self, doc: dict) -> bool | tuple[bool, str]:
        raise NotImplementedError

    def process(self, docs: Iterator[dict], log: "StepLog") -> Iterator[dict]:
        for doc in docs:
            verdict = self.filter(doc)
            keep, reason = verdict if isinstance(verdict, tuple) else (verdict, self.name)
            if keep:
                yield doc
            else:
                log.drop(doc, reason)


register = register_step  # `@register` on a Step subclass makes its `name` usable in pipeline YAML
