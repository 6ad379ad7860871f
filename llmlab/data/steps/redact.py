"""Privacy redaction: find personal identifiers and replace them with typed placeholders such as <EMAIL>.

Regular expressions propose candidates and checksums confirm them, which is what keeps random digit runs
(order numbers, dates, prices, version strings) out:
    CREDIT_CARD  13–19 digits (spaces/dashes allowed), a known issuer prefix, and the Luhn check
                 Σ_i d'_i ≡ 0 (mod 10), where every second digit from the right is doubled (minus 9 if > 9);
    CN_ID        Chinese resident ID (GB 11643-1999): 17 digits + check, a real birth date, and ISO 7064
                 MOD 11-2: check = "10X98765432"[Σ_i d_i · (2^(17-i) mod 11) mod 11];
    SSN          US social security number AAA-GG-SSSS, area not 000, 666 or 9xx, group not 00, serial not 0000;
    PHONE        E.164-style international (+CC …, 8–15 digits), mainland-China mobiles 1[3-9]x xxxx xxxx
                 with optional +86/0086, North-American (NXX) NXX-XXXX, and (optionally) Chinese landlines 0AA-XXXXXXXX;
    IP           IPv4 with every octet 0–255 (not right after "version", "v", "section" …), IPv6 as the standard
                 library parses it (with at least 4 hex digits, so not '::1' or C++'s 'a::b');
    EMAIL        local@domain.tld (not file@2x.png, nor https://user@host);
    URL_CREDENTIALS  scheme://user:password@host.
Overlapping candidates are resolved by that priority (URL_CREDENTIALS > EMAIL > CN_ID > CREDIT_CARD > SSN >
PHONE > IP), then by length. Digit boundaries are ASCII-only, so "电话13812345678" is still found.
`evaluate()` scores the detector on span-labelled text (tests/data/pii_labelled.jsonl): a predicted span is a
true positive when a labelled span of the same type has exactly the same offsets.
"""

import datetime
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from llmlab.config import field
from llmlab.data.steps.base import Step, StepLog
from llmlab.errors import LlmlabError, closest

TYPES = ("URL_CREDENTIALS", "EMAIL", "CN_ID", "CREDIT_CARD", "SSN", "PHONE", "IP")  # priority order
_B = r"(?<![0-9A-Za-z])"  # ASCII boundaries: CJK text touching a number must not hide it
_E = r"(?![0-9A-Za-z])"
PATTERNS = {
    "URL_CREDENTIALS": re.compile(r"(?<![0-9A-Za-z.+-])[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:[^\s/@]+@[A-Za-z0-9.-]+(?::\d+)?"),
    "EMAIL": re.compile(r"(?<![0-9A-Za-z._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+([A-Za-z]{2,24})(?![0-9A-Za-z-])"),
    "CN_ID": re.compile(_B + r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]" + _E),
    "CREDIT_CARD": re.compile(r"(?<![0-9A-Za-z+-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{3})?"
                              r"|\d{4}([ -])\d{6}\2\d{4,5})(?![0-9A-Za-z-])"),  # plain, 4-4-4-4(-3), Amex 4-6-5
    "SSN": re.compile(_B + r"(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![0-9A-Za-z-])"),
    "PHONE": re.compile("|".join([
        r"(?<![0-9A-Za-z+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)",          # China mobile
        r"(?<![0-9A-Za-z+])\+[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,5}\)|\d{1,5})){1,5}(?![\d-])",   # international
        r"(?<![0-9A-Za-z+(-])(?:1[ .-])?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[.-])[2-9]\d{2}[.-]\d{4}(?![\d-])",  # North American
    ])),
    "CN_LANDLINE": re.compile(r"(?<![0-9A-Za-z+(-])(?:\(0\d{2,3}\)|0\d{2,3}-)[2-9]\d{6,7}(?![\d-])"),
    "IPV4": re.compile(r"(?<![0-9A-Za-z.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                       r"(?![0-9A-Za-z]|\.\d)"),
    "IPV6": re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![0-9A-Za-z:]|\.\d)"),
}
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9]|2)|35|3(?:0[0-5]|[68])")  # Visa … UnionPay
_VERSION = re.compile(r"(?:(?<![A-Za-z])(?:version|ver\.?|release|build|v|section|chapter|clause|figure|table)"
                      r"|[§第]|版本号?)\s*[:：]?\s*$", re.IGNORECASE)  # numbered things that look like IPv4
_FILE_TLDS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "pdf", "js", "css", "py", "txt", "zip"}
_CN_WEIGHTS = [2 ** (17 - i) % 11 for i in range(17)]  # 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def cn_id_ok(s: str) -> bool:
    """Birth date real and not in the future, and the ISO 7064 MOD 11-2 check character right."""
    try:
        born = datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    check = "10X98765432"[sum(int(d) * w for d, w in zip(s[:17], _CN_WEIGHTS)) % 11]
    return born <= datetime.date.today() and s[17].upper() == check


def _valid(kind: str, m: re.Match) -> bool:
    s = m.group(0)
    if kind == "EMAIL":  # not a retina file name, nor the user part of a URL (https://user@host)
        return m.group(1).lower() not in _FILE_TLDS and not m.string[:m.start()].endswith("://")
    if kind == "CN_ID":
        return cn_id_ok(s)
    if kind == "CREDIT_CARD":
        digits = re.sub(r"\D", "", s)
        return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)
    if kind == "PHONE":
        return 8 <= len(re.sub(r"\D", "", s)) <= 15
    if kind == "IPV4":  # "version 1.2.3.4" is a valid address but not one
        return not _VERSION.search(m.string[max(0, m.start() - 12):m.start()])
    if kind == "IPV6":
        groups = [g for g in s.split(":") if g]
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            return False
        return len(groups) >= 2 and sum(len(g) for g in groups) >= 4  # not '::1', 'a::b' or C++ 'std::'
    return True


def find_pii(text: str, types=TYPES, landlines: bool = True) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans of personal identifiers in `text`, sorted by start."""
    found = []
    for kind in types:
        sources = {"PHONE": ["PHONE"] + (["CN_LANDLINE"] if landlines else []), "IP": ["IPV4", "IPV6"]}.get(kind, [kind])
        for source in sources:
            found += [(m.start(), m.end(), kind) for m in PATTERNS[source].finditer(text) if _valid(source, m)]
    found.sort(key=lambda s: (TYPES.index(s[2]), s[0] - s[1]))
    kept: list[tuple[int, int, str]] = []
    for span in found:
        if all(span[1] <= k[0] or span[0] >= k[1] for k in kept):
            kept.append(span)
    return sorted(kept)


def redact(text: str, types=TYPES, landlines: bool = True) -> tuple[str, Counter]:
    """`text` with each identifier replaced by <TYPE>, and the number of replacements per type."""
    counts, out, last = Counter(), [], 0
    for start, end, kind in find_pii(text, types, landlines):
        out += [text[last:start], f"<{kind}>"]
        counts[kind] += 1
        last = end
    return "".join(out) + text[last:], counts


def evaluate(rows, types=TYPES) -> dict[str, dict]:
    """Per type: true/false positives, false negatives, precision, recall; rows are {"text", "spans": [[s, e, T]]}."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for row in rows:
        gold = {(s, e, t) for s, e, t in row["spans"]}
        pred = set(find_pii(row["text"], types))
        for s in pred:
            (tp if s in gold else fp)[s[2]] += 1
        for s in gold - pred:
            fn[s[2]] += 1
    table = {}
    for t in types:
        p, r = tp[t] / max(tp[t] + fp[t], 1), tp[t] / max(tp[t] + fn[t], 1)
        table[t] = {"tp": tp[t], "fp": fp[t], "fn": fn[t], "precision": round(p, 4), "recall": round(r, 4)}
    return table


@dataclass
class RedactConfig:
    types: list[str] = field(list(TYPES), help="which identifiers to redact")
    landlines: bool = field(True, help="also redact Chinese landline numbers (0AA-XXXXXXXX)")

    def __post_init__(self):
        for t in self.types:
            if t not in TYPES:
                raise LlmlabError(f"redact_pii.types: unknown type '{t}'{closest(t, TYPES)}; known: {', '.join(TYPES)}")


class RedactPII(Step):
    """Replace emails, phones, IPs, card numbers, national IDs and URL credentials with <TYPE> placeholders."""
    name = "redact_pii"
    Config = RedactConfig

    def process(self, docs: Iterator[dict], log: StepLog) -> Iterator[dict]:
        for doc in docs:
            doc["text"], counts = redact(doc["text"], self.cfg.types, self.cfg.landlines)
            for kind, n in counts.items():
                log.modified(doc, kind, n)
            yield doc
