"""Which characters make words: the one table the cleaning rules and the MinHash dedup share.

Thai, Lao, Tibetan, Myanmar, Khmer, kana and CJK ideographs are written without spaces between
words, so each of their characters counts as a word of its own. CJK symbols and punctuation
(U+3000-303F: the ideographic space, 、 。 「 」) separate words, as ASCII punctuation does.
Hangul is written with spaces and is left out.
"""

# Inclusive code point ranges of scripts written without spaces between words.
UNSPACED_RANGES = [
    (0x0E00, 0x0FFF),  # Thai, Lao, Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth katakana
]
# Non-ASCII punctuation and spaces that separate words: Latin-1 punctuation, general punctuation,
# CJK symbols and punctuation, fullwidth ASCII punctuation.
SEPARATOR_RANGES = [(0x80, 0xBF), (0x2000, 0x206F), (0x3000, 0x303F), (0xFF00, 0xFF0F), (0xFF1A, 0xFF20)]


def regex_class(ranges: list[tuple[int, int]]) -> str:
    """The ranges as the inside of a regex character class: ``\\u0e00-\\u0fff...``."""
    return "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in ranges)
