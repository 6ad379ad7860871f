"""Preference pairs: rows in the formats users have → a prompt (a conversation) and a chosen and a rejected reply
→ token ids with response-only labels.

Formats (detected from the first row's fields):
    hh-rlhf      {"chosen": str, "rejected": str}: whole "\\n\\nHuman: … \\n\\nAssistant: …" transcripts
                 that share everything before the last "Assistant:" turn
    sharegpt     {"conversations": [{"from", "value"}, …], "chosen": {"from", "value"}, "rejected": {…}}
                 (LLaMA-Factory's preference format, as in ../shared/data/preference)
    messages     {"prompt": str | [messages], "chosen": [messages] | str, "rejected": …}
                 (UltraFeedback-binarized: chosen/rejected are the whole conversations, the reply last)
    plain        {"prompt": str, "chosen": str, "rejected": str}

Each side is rendered with the chat template (as in finetune) and the loss falls on the last reply only:
its tokens (and the EOS that ends them) are the labels, everything before is −100.
"""

import dataclasses
import logging
import os
import re

import torch

from llmlab.data.packing import IGNORE
from llmlab.data.sft import SHAREGPT_ROLES, chat_template, encode_chat, read_rows
from llmlab.errors import LlmlabError

log = logging.getLogger("llmlab")

FORMATS = ("hh-rlhf", "sharegpt", "messages", "plain")
_TURN = re.compile(r"\n\n(Human|Assistant): ")
_ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass
class Pair:
    prompt: list[dict]  # the conversation before the reply
    chosen: str
    rejected: str


def detect_format(row: dict, where: str) -> str:
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row:
        return "messages" if isinstance(row.get("chosen"), list) or isinstance(row["prompt"], list) else "plain"
    if "chosen" in row and "rejected" in row:
        return "hh-rlhf"
    raise LlmlabError(f"{where}: cannot tell the preference format from the fields {', '.join(row) or 'none'}; "
                      f"expected chosen/rejected with conversations or prompt (formats: {', '.join(FORMATS)})")


def to_pair(row: dict, fmt: str, where: str, distinct: bool = True) -> Pair:
    """The row as a prompt conversation and two replies; LlmlabError naming the row and field otherwise (and,
    with `distinct`, when the two replies are the same)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise LlmlabError(f"{where}: missing field '{key}'")
    if fmt == "hh-rlhf":
        pair = _hh_pair(_str(row, "chosen", where), _str(row, "rejected", where), where)
    elif fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise LlmlabError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
        prompt = [{"role": _role(t, where), "content": str(t.get("value", ""))} for t in turns]
        pair = Pair(prompt, _reply(row["chosen"], "chosen", where), _reply(row["rejected"], "rejected", where))
    elif fmt == "messages":
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        pair = Pair(prompt, _last(row["chosen"], "chosen", where), _last(row["rejected"], "rejected", where))
    else:
        pair = Pair([{"role": "user", "content": _str(row, "prompt", where)}], _str(row, "chosen", where),
                    _str(row, "rejected", where))
    if distinct and pair.chosen == pair.rejected:
        raise LlmlabError(f"{where}: chosen and rejected are identical; a pair must prefer one reply to another")
    return pair


def _str(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise LlmlabError(f"{where}: field '{key}' must be a non-empty string")
    return value


def _role(turn: dict, where: str) -> str:
    role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
    if role is None:
        raise LlmlabError(f"{where}: unknown speaker '{turn.get('from')}' in conversations")
    return role


def _reply(value, key: str, where: str) -> str:
    text = value.get("value") if isinstance(value, dict) else value
    if not isinstance(text, str) or not text.strip():
        raise LlmlabError(f"{where}: field '{key}' must be a {{from, value}} turn or a string with text")
    return text


def _last(value, key: str, where: str) -> str:
    """The reply of an UltraFeedback side: the last message of the list (an assistant turn), or the string."""
    if isinstance(value, list):
        if not value or value[-1].get("role") != "assistant":
            raise LlmlabError(f"{where}: field '{key}' must end with an assistant message")
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise LlmlabError(f"{where}: field '{key}' has no reply text")
    return value


def _hh_pair(chosen: str, rejected: str, where: str) -> Pair:
    """An hh-rlhf pair: the prompt is the transcripts' shared beginning up to its last "\n\nAssistant:" (as TRL
    extracts it), the replies the rest. A reply may itself hold "\n\nHuman:" lines (the data's models wrote
    some), so the replies are never split into turns; only the shared prompt is."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(_ASSISTANT)
    if cut < 0:
        raise LlmlabError(f"{where}: an hh-rlhf pair's transcripts must share their beginning up to an "
                          "\\n\\nAssistant: turn")
    parts = _TURN.split(chosen[:cut])
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "Human":
        raise LlmlabError(f"{where}: an hh-rlhf transcript must alternate \\n\\nHuman: … \\n\\nAssistant: … "
                          "and the prompt must end with the Human")
    roles = {"Human": "user", "Assistant": "assistant"}
    prompt = [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]
    return Pair(prompt, chosen[cut + len(_ASSISTANT):].strip(), rejected[cut + len(_ASSISTANT):].strip())


def encode_side(pair: Pair, reply: str, tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the prompt followed by `reply`: labels on the reply's tokens only."""
    ids, labels = encode_chat([*pair.prompt, {"role": "assistant", "content": reply}], tokenizer, template)
    # encode_chat labels every assistant turn; earlier ones are context here. The reply is the last run of labels.
    start = max((i for i, label in enumerate(labels) if label != IGNORE), default=-1) + 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return ids, [IGNORE] * start + labels[start:]


def load_pairs(data: str, tokenizer, *, template: str = "auto", max_len: int = 1024,
               limit: int | None = None) -> tuple[list[dict], dict]:
    """Tokenized pairs {chosen_ids, chosen_labels, rejected_ids, rejected_labels} and counts; pairs longer than
    `max_len`, and pairs whose two replies are the same, are left out and counted (never silently)."""
    rows = read_rows(data)
    if not rows:
        raise LlmlabError(f"{data} holds no rows")
    rows = rows[:limit] if limit else rows
    fmt = detect_format(rows[0], f"{data} row 1")
    tpl = chat_template(tokenizer, template)
    pairs, too_long, identical = [], 0, []
    for number, row in enumerate(rows, 1):
        if isinstance(row.get("chosen"), str) and row.get("chosen") == row.get("rejected"):
            identical.append(number)  # real data has a few (hh-rlhf helpful-base); they teach nothing
            continue
        pair = to_pair(row, fmt, f"{data} row {number}")
        (c_ids, c_lab), (r_ids, r_lab) = (encode_side(pair, reply, tokenizer, tpl) for reply in (pair.chosen,
                                                                                                 pair.rejected))
        if max(len(c_ids), len(r_ids)) > max_len:
            too_long += 1
            continue
        pairs.append({"chosen_ids": c_ids, "chosen_labels": c_lab, "rejected_ids": r_ids, "rejected_labels": r_lab})
    if identical:
        log.warning("%s: %d pair(s) with identical chosen and rejected left out (row %s%s)", data, len(identical),
                    identical[0], " …" if len(identical) > 1 else "")
    if not pairs:
        raise LlmlabError(f"no pairs left in {data}: of {len(rows)}, {too_long} are longer than --max-len {max_len} "
                          f"and {len(identical)} identical")
    return pairs, {"rows": len(rows), "pairs": len(pairs), "too_long": too_long, "identical": len(identical),
                   "format": fmt}


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """One batch of 2B right-padded rows: the B chosen sides, then the B rejected sides."""
    sides = [(p["chosen_ids"], p["chosen_labels"]) for p in pairs] + [(p["rejected_ids"], p["rejected_labels"])
                                                                      for p in pairs]
    width = max(len(ids) for ids, _ in sides)
    input_ids = torch.full((len(sides), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sides), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(sides), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(sides):
        input_ids[i, :len(ids)], labels[i, :len(lab)], mask[i, :len(ids)] = (torch.tensor(ids), torch.tensor(lab), 1)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
             "num_tokens": sum(len(ids) for ids, _ in sides)}
    if "ref_logps" in pairs[0]:
        batch["ref_logps"] = torch.tensor([p["ref_logps"][0] for p in pairs] + [p["ref_logps"][1] for p in pairs])
    return batch


# ---- unpaired completions (KTO): {prompt, completion, label} rows, or pairs split in two ----

def load_unpaired(data: str, tokenizer, *, template: str = "auto", max_len: int = 1024,
                  limit: int | None = None) -> tuple[list[dict], dict]:
    """Tokenized completions {ids, labels, kl_ids, kl_labels, desirable} and counts.

    Rows are TRL's unpaired format, {"prompt": str | [messages], "completion": str | [messages], "label": bool}
    (thumbs up or down), or preference pairs in any format above, each giving one desirable and one undesirable
    completion. The KL side of completion i is its prompt followed by completion i+1's reply: a mismatched pair,
    on which KTO estimates its reference point KL(π‖π_ref)."""
    rows = read_rows(data)
    if not rows:
        raise LlmlabError(f"{data} holds no rows")
    rows = rows[:limit] if limit else rows
    tpl = chat_template(tokenizer, template)
    if "completion" in rows[0] or "label" in rows[0]:
        items = [_unpaired(row, f"{data} row {n}") for n, row in enumerate(rows, 1)]
        fmt = "unpaired"
    else:
        fmt = detect_format(rows[0], f"{data} row 1")
        items = []
        for n, row in enumerate(rows, 1):
            if isinstance(row.get("chosen"), str) and row.get("chosen") == row.get("rejected"):
                continue
            pair = to_pair(row, fmt, f"{data} row {n}")
            items += [(pair.prompt, pair.chosen, True), (pair.prompt, pair.rejected, False)]
    labels = {label for _, _, label in items}
    if len(labels) < 2:
        kind = "desirable" if True in labels else "undesirable"
        raise LlmlabError(f"{data}: every completion is {kind}; KTO needs both thumbs-up and thumbs-down rows")
    out, too_long = [], 0
    for i, (prompt, reply, desirable) in enumerate(items):
        ids, lab = encode_side(Pair(prompt, "", ""), reply, tokenizer, tpl)
        kl_ids, kl_lab = encode_side(Pair(prompt, "", ""), items[(i + 1) % len(items)][1], tokenizer, tpl)
        if max(len(ids), len(kl_ids)) > max_len:
            too_long += 1
            continue
        out.append({"ids": ids, "labels": lab, "kl_ids": kl_ids, "kl_labels": kl_lab, "desirable": desirable})
    if not out:
        raise LlmlabError(f"no completions left in {data}: all {len(items)} are longer than --max-len {max_len}")
    return out, {"rows": len(rows), "completions": len(out), "too_long": too_long, "format": fmt,
                 "desirable": sum(x["desirable"] for x in out)}


def _unpaired(row: dict, where: str) -> tuple[list[dict], str, bool]:
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise LlmlabError(f"{where}: missing field '{key}' (unpaired rows are prompt, completion, label)")
    label = row["label"]
    if isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if label not in (True, False, 0, 1):
        raise LlmlabError(f"{where}: field 'label' must be true (desirable) or false, got {label!r}")
    prompt = row["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return prompt, _last(row["completion"], "completion", where), bool(label)


def collate_unpaired(items: list[dict], pad_id: int) -> dict:
    """One batch of 2B right-padded rows: the B completions, then their B mismatched KL sides."""
    sides = [{"chosen_ids": x["ids"], "chosen_labels": x["labels"], "rejected_ids": x["kl_ids"],
              "rejected_labels": x["kl_labels"], **({"ref_logps": x["ref_logps"]} if "ref_logps" in x else {})}
             for x in items]
    batch = collate_pairs(sides, pad_id)
    batch["desirable"] = torch.tensor([x["desirable"] for x in items])
    return batch


# ---- prompts only (PPO, GRPO, rejection sampling) ----

def load_prompts(data: str, *, limit: int | None = None) -> list[dict]:
    """{"messages": the conversation to answer, "answer": the exact answer or None} per row.

    Rows: {"prompt": str | [messages], "answer"?}, alpaca {"instruction", "input"?, "output"?} (as
    `llmlab data tasks` writes them: the output is the exact answer a verifiable reward checks), or preference
    pairs in any format above (their prompt)."""
    rows = read_rows(data)
    if not rows:
        raise LlmlabError(f"{data} holds no rows")
    rows = rows[:limit] if limit else rows
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{data} row {n}"
        row = {k: v for k, v in row.items() if v is not None}  # a table's missing cells read as None
        if "instruction" in row:
            text = "\n\n".join(str(row[k]) for k in ("instruction", "input") if str(row.get(k) or "").strip())
            out.append({"messages": [{"role": "user", "content": text}], "answer": _answer(row.get("output"))})
        elif "chosen" in row or "conversations" in row:
            pair = to_pair(row, detect_format(row, where), where, distinct=False)  # only the prompt is used
            out.append({"messages": pair.prompt, "answer": None})
        elif "prompt" in row:
            prompt = row["prompt"]
            if isinstance(prompt, str) and not prompt.strip():
                raise LlmlabError(f"{where}: field 'prompt' is empty")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            out.append({"messages": messages, "answer": _answer(row.get("answer", row.get("output")))})
        else:
            raise LlmlabError(f"{where}: no prompt: expected a 'prompt', an alpaca 'instruction' or a preference pair "
                              f"(fields: {', '.join(row) or 'none'})")
    return out


def _answer(value) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value)
