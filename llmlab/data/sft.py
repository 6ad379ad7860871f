"""Supervised fine-tuning data: rows → chat messages → token ids with response-only labels.

Rows come from a local JSON/JSONL/CSV/Parquet file or a Hugging Face hub dataset, in one of four
formats (detected from the first row's fields unless `--format` says):
    alpaca     {"instruction", "input" (optional), "output"}
    messages   {"messages": [{"role", "content"}, …]}                  (OpenAI style)
    sharegpt   {"conversations": [{"from": human|gpt|system, "value"}, …]}
    text       {"text"}                                                 (loss on every token)
A folder of token shards (`llmlab data pack`, or a pipeline's `output.tokenizer`) is read as
already-tokenized text: windows of `max_len` tokens, the loss on every token (continued pretraining).
Conversations are rendered with the tokenizer's chat template (or a built-in one, `--template
alpaca`). The loss falls only on assistant replies, as in InstructGPT's SFT stage (Ouyang et al.
2022, https://arxiv.org/abs/2203.02155): labels are −100 everywhere else, and

    L = − Σ_{t ∈ reply tokens} log p(x_t | x_<t) / |reply tokens|

A reply's tokens are found by rendering the conversation up to the reply (with the generation
prompt) and up to its end, and mapping those character spans onto the full rendering's tokens;
each span is cut after its first EOS token, so the template's trailing newline is not learned.
"""

import dataclasses
import random
from importlib import resources
from pathlib import Path

from llmlab.data.packing import IGNORE, pack
from llmlab.data.shards import MANIFEST, TokenShards
from llmlab.errors import LlmlabError

FORMATS = ("alpaca", "messages", "sharegpt", "text")
TEMPLATES = ("alpaca",)  # built-in chat templates, in llmlab/data/templates/<name>.jinja
READERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclasses.dataclass
class SFTData:
    train: list[dict]   # examples: {"input_ids", "labels"} (+ "position_ids" when packed)
    eval: list[dict]
    stats: dict


def read_rows(source: str) -> list[dict]:
    """All rows of a local data file, or of a hub dataset's train split."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in READERS:
            raise LlmlabError(f"data file {path} must end in {', '.join(READERS)}")
        if not path.read_bytes()[:65536].strip():
            raise LlmlabError(f"data file {path} is empty; give a file with at least one row")
        try:
            rows = datasets.load_dataset(READERS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as e:  # datasets wraps pyarrow's parse errors; the innermost says what is wrong
            raise LlmlabError(f"could not read data file {path}: {_root_cause(e)}") from None
    elif path.exists() or "/" not in source or source.startswith((".", "/", "~")) or path.suffix:
        raise LlmlabError(f"data file not found: {source}")
    else:
        try:
            rows = datasets.load_dataset(source, split="train")
        except Exception as e:
            raise LlmlabError(f"could not load dataset '{source}' from the Hugging Face hub ({_root_cause(e)}); "
                              "check the id and your network, or give a local .jsonl/.json/.csv/.parquet file"
                              ) from None
    rows = rows.to_list()
    if not rows:
        raise LlmlabError(f"data {source} has no rows")
    return rows


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or (error.__context__ is not None and not str(error).strip()):
        error = error.__cause__ or error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def detect_format(row: dict, where: str) -> str:
    keys = {k for k, v in row.items() if v is not None}
    for fmt, needed in (("messages", {"messages"}), ("sharegpt", {"conversations"}),
                        ("alpaca", {"instruction", "output"}), ("text", {"text"})):
        if needed <= keys:
            return fmt
    raise LlmlabError(f"{where}: cannot tell the data format from its fields ({', '.join(sorted(keys))}); "
                      f"expected alpaca (instruction, output), messages, sharegpt (conversations) or text, "
                      "or give --format")


def to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    """One row of a conversation format as a list of {role, content} messages."""
    if fmt == "alpaca":
        prompt = _text(row, "instruction", where)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise LlmlabError(f"{where}: field 'input' must be text, got {type(extra).__name__}")
        if extra and extra.strip():
            prompt += "\n\n" + extra
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)}]
    key, role_key, content_key = (("messages", "role", "content") if fmt == "messages"
                                  else ("conversations", "from", "value"))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise LlmlabError(f"{where}: missing field '{key}' (a non-empty list of turns)")
    messages = []
    for i, turn in enumerate(turns):
        here = f"{where}, {key}[{i}]"
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if fmt == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise LlmlabError(f"{here}: field '{role_key}' must be one of {', '.join(SHAREGPT_ROLES)}, "
                                  f"got {role!r}")
            role = SHAREGPT_ROLES[role]
        elif role not in ("system", "user", "assistant", "tool"):
            raise LlmlabError(f"{here}: field '{role_key}' must be system, user, assistant or tool, got {role!r}")
        messages.append({"role": role, "content": _text(turn, content_key, here)})
    if not any(m["role"] == "assistant" for m in messages):
        raise LlmlabError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise LlmlabError(f"{where}: missing field '{key}'")
    if not isinstance(value, str):
        raise LlmlabError(f"{where}: field '{key}' must be text, got {type(value).__name__}")
    return value


def chat_template(tokenizer, template: str) -> str:
    """The Jinja chat template to render with: the tokenizer's own ("auto") or a built-in one."""
    if template == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise LlmlabError("the model's tokenizer has no chat template, which this data format needs; "
                              "use --template alpaca (the classic '### Instruction: … ### Response:' prompt)")
        return tokenizer.chat_template
    if template not in TEMPLATES:
        raise LlmlabError(f"unknown --template '{template}'; use auto or {', '.join(TEMPLATES)}")
    return resources.files("llmlab.data").joinpath(f"templates/{template}.jinja").read_text(encoding="utf-8")


def encode_chat(messages: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation, labels −100 except on assistant replies (+ EOS)."""
    if not tokenizer.is_fast:
        raise LlmlabError("locating replies needs a fast (Rust) tokenizer with offsets; this model's is a slow one")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, chat_template=template, add_generation_prompt=gen) if msgs else ""
    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        begin, end = render(messages[:i], True), render(messages[:i + 1])
        if not (end.startswith(begin) and full.startswith(end)):
            raise LlmlabError("the chat template renders a conversation's beginning differently from the whole "
                              "(it rewrites earlier turns), so replies cannot be located; use --template alpaca")
        spans.append((len(begin), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, span = enc["input_ids"], [IGNORE] * len(enc["input_ids"]), 0
    for t, (start, _) in enumerate(enc["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and start >= spans[span][0]:
            labels[t] = ids[t]
            if ids[t] == tokenizer.eos_token_id:  # the end of the turn: what follows is template glue
                spans[span] = (spans[span][0], start)
    return ids, labels


def encode_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def tokenize_rows(rows: list[tuple[int, dict]], tokenizer, fmt: str, template: str, max_len: int, name: str):
    """Examples of the (row number, row) pairs, and counts of rows truncated to `max_len` and dropped for it."""
    tpl = None if fmt == "text" else chat_template(tokenizer, template)
    examples, truncated, dropped = [], 0, 0
    for number, row in rows:
        where = f"{name} row {number}"
        if fmt == "text":
            ids, labels = encode_text(_text(row, "text", where), tokenizer)
        else:
            ids, labels = encode_chat(to_messages(row, fmt, where), tokenizer, tpl)
        if len(ids) > max_len:
            ids, labels, truncated = ids[:max_len], labels[:max_len], truncated + 1
        labels[0] = IGNORE  # nothing predicts the first token; masking it keeps packed rows equal to unpacked
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, {"rows": len(rows), "truncated": truncated, "dropped": dropped}


def load_sft_data(data: str, tokenizer, *, eval_data: str | None = None, eval_fraction: float = 0.0,
                  fmt: str = "auto", template: str = "auto", max_len: int = 1024, packing: bool = False,
                  seed: int = 0) -> SFTData:
    """Training and held-out examples, tokenized, truncated and (optionally) packed."""
    if is_token_shards(data):
        return token_shard_data(data, tokenizer, eval_fraction=eval_fraction, max_len=max_len, seed=seed)
    rows = list(enumerate(read_rows(data), 1))
    fmt = detect_format(rows[0][1], f"{data} row 1") if fmt == "auto" else fmt
    eval_rows = list(enumerate(read_rows(eval_data), 1)) if eval_data else []
    if eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(eval_fraction * len(rows)))
        if n_eval >= len(rows):
            raise LlmlabError(f"--eval-fraction {eval_fraction} leaves no training rows out of {len(rows)}")
        eval_rows = [rows[i] for i in sorted(order[:n_eval])]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    train, stats = tokenize_rows(rows, tokenizer, fmt, template, max_len, data)
    if not train:
        raise LlmlabError(f"no training examples left in {data}: all {stats['rows']} rows lost their responses "
                          f"to truncation; raise --max-len (now {max_len})")
    held, eval_stats = tokenize_rows(eval_rows, tokenizer, fmt, template, max_len, eval_data or data)
    stats.update(format=fmt, examples=len(train), eval_examples=len(held), eval_truncated=eval_stats["truncated"],
                 tokens=sum(len(e["input_ids"]) for e in train),
                 target_tokens=sum(sum(label != IGNORE for label in e["labels"]) for e in train))
    if packing:
        train, held = pack(train, max_len), pack(held, max_len)
        stats["packed_rows"] = len(train)
    return SFTData(train, held, stats)


def is_token_shards(data: str) -> bool:
    path = Path(data).expanduser()
    return (path / MANIFEST).is_file() or (path / "tokens" / MANIFEST).is_file()


def token_shard_data(data: str, tokenizer, *, eval_fraction: float, max_len: int, seed: int) -> SFTData:
    """Windows of `max_len` tokens over packed token shards, labelled with themselves (every token a target)."""
    shards = TokenShards(data, seq_len=max_len - 1)  # windows of seq_len + 1 = max_len tokens
    if shards.manifest["vocab_size"] > len(tokenizer):
        raise LlmlabError(f"token shards {data} were made with a {shards.manifest['vocab_size']}-token vocabulary "
                          f"({shards.manifest['tokenizer'] or 'unknown tokenizer'}), larger than the model's "
                          f"{len(tokenizer)}; pack them with the model's tokenizer")
    if not len(shards):
        raise LlmlabError(f"token shards {data} hold fewer than --max-len {max_len} tokens; lower --max-len")
    examples = [{"input_ids": w.tolist(), "labels": w.tolist()} for w in map(shards.__getitem__, range(len(shards)))]
    random.Random(seed).shuffle(examples)
    n_eval = round(eval_fraction * len(examples)) if eval_fraction else 0
    if eval_fraction and not 0 < n_eval < len(examples):
        raise LlmlabError(f"--eval-fraction {eval_fraction} of {len(examples)} windows leaves an empty split")
    train, held = examples[n_eval:], examples[:n_eval]
    stats = {"rows": len(examples), "truncated": 0, "dropped": 0, "format": "tokens", "examples": len(train),
             "eval_examples": len(held), "eval_truncated": 0, "tokens": len(train) * max_len,
             "target_tokens": len(train) * (max_len - 1)}
    return SFTData(train, held, stats)
