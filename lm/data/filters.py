"""Cleaning filters: small functions of one signature, and one runner that counts their verdicts.

A filter takes a :class:`Document` and returns ``None`` to keep it or a reason string to drop it
(the datatrove convention). Filters that rewrite text (Unicode normalisation, PII redaction)
change ``doc.text`` in place and count what they did in ``doc.counts``. :func:`build_filters`
turns a ``CleanConfig`` into the list; :func:`run_filters` applies it to one document.

The word-based quality rules come from Gopher (Rae et al. 2021, "Scaling Language Models",
appendix A.1.1) and C4 (Raffel et al. 2020); the code rules from Codex (Chen et al. 2021) and
StarCoder (Li et al. 2023). Word rules are script-aware: text written without spaces between
words (Chinese, Japanese, Thai ...) has no "words" in the whitespace sense, so the word-length
rule is skipped for it and every such character counts as one word for the other rules.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from lm.config import CleanConfig
from lm.data.writing_systems import UNSPACED_RANGES, regex_class


@dataclass
class Document:
    doc_id: str
    text: str
    counts: Counter = field(default_factory=Counter)  # e.g. pii/email: 2


Filter = Callable[[Document], str | None]


# --- text rewriting ---------------------------------------------------------------------------

# C0/C1 control characters except tab and newline; U+FEFF (BOM / zero-width no-break space).
# Zero-width joiners stay: emoji sequences and Indic scripts need them.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")


def normalize_unicode(doc: Document) -> str | None:
    """NFC (canonical composition: same text, one encoding; NFKC would rewrite code's look-alikes)."""
    text = doc.text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text, n = _CONTROL.subn("", text)
    if n:
        doc.counts["clean/control_chars_removed"] += n
    doc.text = text
    return None if text.strip() else "empty"


PII_PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(
        r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])"
    ),
    # International (+CC ...) or North-American style with separators; bare digit runs are not
    # phones (in code they are constants).
    "phone": re.compile(
        r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}(?:[ .-]\d{2,4})?"
        r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w.-]?\d)"
    ),
    "ip": re.compile(
        r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)"
    ),
}
PII_PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>"}
# A full pattern tried at every position of a 30 MB corpus costs seconds (the look-behinds), so a
# cheap screen that every match must contain finds candidates and the full pattern runs only in a
# window around each: (screen, how far a match may start before the screen's hit).
PII_SCREENS: dict[str, tuple[re.Pattern, int]] = {
    "email": (re.compile(r"@[A-Za-z0-9-]+\.[A-Za-z]"), 128),
    "phone": (re.compile(r"\d[ .-]\d\d\d"), 24),
    "ip": (re.compile(r"\d\.\d{1,3}\.\d"), 4),
}


def _find_pii(text: str, kind: str) -> list[tuple[int, int]]:
    screen, back = PII_SCREENS[kind]
    full = PII_PATTERNS[kind]
    spans: list[tuple[int, int]] = []
    last = 0
    for hit in screen.finditer(text):
        pos = hit.start()
        if pos < last:
            continue
        for m in full.finditer(text, max(last, pos - back), min(len(text), hit.end() + 256)):
            if m.start() > pos:
                break
            if m.end() > pos:
                spans.append(m.span())
                last = m.end()
                break
    return spans


def redact_pii(doc: Document) -> str | None:
    """Replace e-mail addresses, phone numbers and IPv4 addresses by a placeholder, counted per kind."""
    text = doc.text
    for kind in PII_PATTERNS:
        spans = _find_pii(text, kind)
        if not spans:
            continue
        doc.counts[f"pii/{kind}"] += len(spans)
        parts, prev = [], 0
        for a, b in spans:
            parts.append(text[prev:a])
            parts.append(PII_PLACEHOLDER[kind])
            prev = b
        parts.append(text[prev:])
        text = "".join(parts)
    doc.text = text
    return None


# --- script-aware words ------------------------------------------------------------------------

_UNSPACED = regex_class(UNSPACED_RANGES)
_WORD = re.compile(f"[{_UNSPACED}]|[^\\s{_UNSPACED}]+")
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")


def words_of(text: str) -> list[str]:
    """Whitespace-separated words; each character of an unspaced script is a word of its own."""
    if text.isascii():
        return text.split()
    return _WORD.findall(text)


def unspaced_fraction(text: str) -> float:
    if text.isascii() or not text:
        return 0.0
    return len(_UNSPACED_CHAR.findall(text)) / max(1, len(text) - text.count(" ") - text.count("\n"))


# --- rules -------------------------------------------------------------------------------------


def length_filter(min_chars: int, max_chars: int) -> Filter:
    def length(doc: Document) -> str | None:
        text = doc.text
        n = len(text)
        if n < min_chars and not text.isascii():
            # Script-aware: a Chinese or Japanese character carries about as much as a short
            # English word, so it counts as 3 characters (as its UTF-8 width does) toward the minimum.
            n += 2 * len(_UNSPACED_CHAR.findall(text))
        if n < min_chars:
            return "too_short"
        if n > max_chars:
            return "too_long"
        return None

    return length


def gopher_filter(s: dict[str, object]) -> Filter | None:
    """Gopher's word rules: mean word length, symbol-to-word ratio, words with a letter."""
    lo, hi = s["min_mean_word_len"], s["max_mean_word_len"]
    max_sym, min_alpha = s["max_symbol_ratio"], s["min_alpha_ratio"]
    if lo is None and hi is None and max_sym is None and min_alpha is None:
        return None

    def gopher(doc: Document) -> str | None:
        text = doc.text
        words = words_of(text)
        if not words:
            return "no_words"
        if (lo is not None or hi is not None) and unspaced_fraction(text) < 0.3:
            spaced = text.split()
            mean = sum(map(len, spaced)) / len(spaced)
            if lo is not None and mean < lo:
                return "mean_word_len_low"
            if hi is not None and mean > hi:
                return "mean_word_len_high"
        if max_sym is not None:
            symbols = text.count("#") + text.count("...") + text.count("\u2026")
            if symbols / len(words) > max_sym:
                return "symbol_ratio"
        if min_alpha is not None:
            # str.isalpha is Unicode-aware: Cyrillic, Greek, CJK and kana are letters.
            alpha = sum(1 for w in words if any(c.isalpha() for c in w))
            if alpha / len(words) < min_alpha:
                return "alpha_ratio"
        return None

    return gopher


def dup_line_filter(max_fraction: float) -> Filter:
    """Gopher: the fraction of (non-blank) lines that repeat an earlier line."""

    def dup_lines(doc: Document) -> str | None:
        lines = [ln.strip() for ln in doc.text.split("\n")]
        lines = [ln for ln in lines if ln]
        if len(lines) < 4:
            return None
        dups = len(lines) - len(set(lines))
        return "dup_lines" if dups / len(lines) > max_fraction else None

    return dup_lines


def top_ngram_filter(max_fraction: float) -> Filter:
    """Gopher: characters covered by the most frequent word 2-, 3-, 4-gram; limits 0.20/0.18/0.16,
    i.e. the configured limit for bigrams and 0.02 less per extra word."""

    def top_ngram(doc: Document) -> str | None:
        words = words_of(doc.text)
        if len(words) < 10:
            return None
        total = sum(map(len, words))
        for n in (2, 3, 4):
            grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total > max_fraction - 0.02 * (n - 2):
                return f"top_{n}gram"
        return None

    return top_ngram


def code_line_filter(max_line_len: int | None, max_mean_line_len: float | None) -> Filter:
    """Codex/StarCoder: minified or generated files have very long lines."""

    def line_lengths(doc: Document) -> str | None:
        lines = doc.text.split("\n")
        if max_line_len is not None and max(map(len, lines)) > max_line_len:
            return "line_too_long"
        if max_mean_line_len is not None and len(doc.text) / len(lines) > max_mean_line_len:
            return "mean_line_len"
        return None

    return line_lengths


_NON_ALNUM = re.compile(r"[\W_]+")
_ASCII_NON_ALNUM = bytes(c for c in range(128) if not chr(c).isalnum())


def alnum_filter(min_ratio: float) -> Filter:
    """Codex/StarCoder: the fraction of alphanumeric characters (data blobs, base64, tables)."""

    def alnum(doc: Document) -> str | None:
        text = doc.text
        if text.isascii():  # bytes.translate deletes in C, ~20x faster than the regex
            alnum_chars = len(text.encode("ascii").translate(None, _ASCII_NON_ALNUM))
        else:
            alnum_chars = len(text) - sum(map(len, _NON_ALNUM.findall(text)))
        return "alnum_ratio" if alnum_chars < min_ratio * len(text) else None

    return alnum


_LOREM = re.compile(r"lorem ipsum", re.IGNORECASE)


def lorem_filter(doc: Document) -> str | None:
    """C4: placeholder text."""
    return "lorem_ipsum" if _LOREM.search(doc.text) else None


def build_filters(cfg: CleanConfig) -> list[Filter]:
    """The filter list in the order they run: rewrite first, then cheap rules, then costly ones."""
    s = cfg.model_dump()  # the preset's thresholds are filled in when the config loads
    filters: list[Filter] = []
    if s["normalize_unicode"]:
        filters.append(normalize_unicode)
    filters.append(length_filter(int(s["min_chars"]), int(s["max_chars"])))
    if s["max_line_len"] is not None or s["max_mean_line_len"] is not None:
        filters.append(code_line_filter(s["max_line_len"], s["max_mean_line_len"]))
    if s["min_alnum_ratio"] is not None:
        filters.append(alnum_filter(float(s["min_alnum_ratio"])))
    if cfg.preset == "prose":
        filters.append(lorem_filter)
    gopher = gopher_filter(s)
    if gopher is not None:
        filters.append(gopher)
    if s["max_dup_line_fraction"] is not None:
        filters.append(dup_line_filter(float(s["max_dup_line_fraction"])))
    if s["max_top_ngram_fraction"] is not None:
        filters.append(top_ngram_filter(float(s["max_top_ngram_fraction"])))
    if s["redact_pii"]:
        filters.append(redact_pii)  # last: only kept documents pay for the regexes
    return filters


def run_filters(filters: list[Filter], doc: Document) -> str | None:
    """Apply filters in order; the first drop reason wins (None: the document is kept)."""
    for f in filters:
        reason = f(doc)
        if reason is not None:
            return reason
    return None
