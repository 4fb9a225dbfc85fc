"""PII spans in text, and their redaction with typed placeholders.

Candidates are found with patterns and then validated with maintained libraries
where one exists, so that random digit runs are not flagged:

* ``email``: address pattern;
* ``phone``: ``phonenumbers`` (Google's libphonenumber), international numbers and
  numbers of the configured default region;
* ``credit_card``: 13-19 digits (spaces or dashes allowed), Luhn-checked (``python-stdnum``);
* ``iban``: country code + check digits + account, mod-97 checked (``python-stdnum``);
* ``us_ssn``: ``AAA-GG-SSSS`` with the invalid ranges excluded (``python-stdnum``);
* ``ip_address``: IPv4 and IPv6, validated by ``ipaddress``;
* ``secret``: API-key-like tokens (``sk-...``, ``ghp_...``, ``AKIA...``, ``xox?-...``,
  bearer tokens, PEM private keys, long high-entropy strings after key/secret/token=).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass

PII_TYPES = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secret")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")
# Digit runs that could be phone numbers; libphonenumber only looks at these (on a whole
# megabyte of prose it would take seconds, on the candidates milliseconds).
_PHONE_CANDIDATE = re.compile(r"\+?\(?\d[\d ().\-/]{5,22}\d")
# Validating a candidate costs ~0.3 ms; past this many in one text, candidates with
# 10 or more digits are flagged unvalidated (over-redacting beats stalling the gateway).
_MAX_VALIDATED_PHONES = 500
_SECRETS = [
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}"),
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )?PRIVATE KEY-----"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{20,}=*"),
]
_KEYED_SECRET = re.compile(
    r"(?i)\b(?:api[_-]?key|secret|token|password|passwd|access[_-]?key)\b\s*[:=]\s*['\"]?([A-Za-z0-9_\-./+=]{15,}[A-Za-z0-9_\-/+=])"
)


@dataclass(frozen=True, slots=True)
class PIISpan:
    type: str
    start: int
    end: int
    text: str

    def to_dict(self, with_text: bool = False) -> dict:
        out = {"type": self.type, "start": self.start, "end": self.end}
        if with_text:
            out["text"] = self.text
        return out


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


class PIIDetector:
    """``find(text)`` -> non-overlapping spans, earliest first; ``redact(text)`` -> text with ``<TYPE>``."""

    def __init__(self, types: tuple[str, ...] | list[str] = PII_TYPES, default_region: str = "US") -> None:
        unknown = set(types) - set(PII_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {', '.join(PII_TYPES)}")
        self.types = set(types)
        self.region = default_region

    def find(self, text: str) -> list[PIISpan]:
        if not text:
            return []
        found: list[PIISpan] = []
        t = self.types
        if "secret" in t:
            for pattern in _SECRETS:
                found += [PIISpan("secret", m.start(), m.end(), m.group()) for m in pattern.finditer(text)]
            for m in _KEYED_SECRET.finditer(text):
                value = m.group(1)
                if _entropy(value) >= 3.0:
                    found.append(PIISpan("secret", m.start(1), m.end(1), value))
        if "email" in t:
            found += [PIISpan("email", m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]
        if "iban" in t:
            from stdnum import iban

            for m in _IBAN.finditer(text):
                if iban.is_valid(m.group()):
                    found.append(PIISpan("iban", m.start(), m.end(), m.group()))
        if "credit_card" in t:
            from stdnum import luhn

            for m in _CARD.finditer(text):
                digits = re.sub(r"[ -]", "", m.group())
                if 13 <= len(digits) <= 19 and luhn.is_valid(digits) and len(set(digits)) > 1:
                    found.append(PIISpan("credit_card", m.start(), m.end(), m.group()))
        if "us_ssn" in t:
            from stdnum.us import ssn

            for m in _SSN.finditer(text):
                if ssn.is_valid(m.group()):
                    found.append(PIISpan("us_ssn", m.start(), m.end(), m.group()))
        if "ip_address" in t:
            for pattern in (_IPV4, _IPV6):
                for m in pattern.finditer(text):
                    try:
                        ipaddress.ip_address(m.group())
                    except ValueError:
                        continue
                    found.append(PIISpan("ip_address", m.start(), m.end(), m.group()))
        if "phone" in t:
            import phonenumbers

            validated = 0
            for cand in _PHONE_CANDIDATE.finditer(text):
                digits = sum(ch.isdigit() for ch in cand.group())
                if digits < 8:
                    continue
                validated += 1
                if validated > _MAX_VALIDATED_PHONES:
                    if digits >= 10:
                        found.append(PIISpan("phone", cand.start(), cand.end(), cand.group()))
                    continue
                for match in phonenumbers.PhoneNumberMatcher(cand.group(), self.region,
                                                             leniency=phonenumbers.Leniency.VALID):  # fmt: skip
                    start = cand.start() + match.start
                    found.append(PIISpan("phone", start, start + len(match.raw_string), match.raw_string))
        return _non_overlapping(found)

    def redact(self, text: str, spans: list[PIISpan] | None = None) -> str:
        spans = self.find(text) if spans is None else spans
        out, last = [], 0
        for s in spans:
            out.append(text[last : s.start])
            out.append(f"<{s.type.upper()}>")
            last = s.end
        out.append(text[last:])
        return "".join(out)


def _non_overlapping(spans: list[PIISpan]) -> list[PIISpan]:
    """Earliest first; on overlap the longer span wins (a card number is not also a phone number)."""
    spans.sort(key=lambda s: (s.start, -(s.end - s.start)))
    kept: list[PIISpan] = []
    for s in spans:
        if kept and s.start < kept[-1].end:
            if s.end - s.start > kept[-1].end - kept[-1].start:
                kept[-1] = s
            continue
        kept.append(s)
    return kept
