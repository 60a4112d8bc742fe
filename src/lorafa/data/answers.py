"""The final numeric answer of a worked solution or a model's generation (GSM8K's "#### 72", MetaMathQA's "The
answer is: 72"): one parser, for the gold answers the data loaders store and the predictions the evaluation reads.

It lives with the data, not in `lorafa.eval`, because the loaders need it and the evaluation already depends on them.
"""

from __future__ import annotations

import re
from decimal import Decimal

# A number: optional sign (also on the far side of a "$"), thousands groups or plain digits, optional decimals.
# The look-behind keeps "5-3" from reading as "-3" and "x2" from reading as "2"; "\u2212" is the Unicode minus.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+\u2212]?)\$?(?P<sign2>[-+\u2212]?)"
    r"(?P<digits>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
)
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def _normalise(match: re.Match) -> str:
    value = Decimal(match.group("digits").replace(",", ""))
    if any(c in "-\u2212" for c in match.group("sign") + match.group("sign2")):
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # "18.00" -> "18", "-0" -> "0"
    return format(value.normalize(), "f")  # "3.50" -> "3.5", never "35E-1"


def _as_written(match: re.Match) -> str:
    negative = any(c in "-\u2212" for c in match.group("sign") + match.group("sign2"))
    return ("-" if negative else "") + match.group("digits").replace(",", "")  # "$2.50" -> "2.50", "-1,000" -> "-1000"


def extract_answer(text: str | None, *, last_number: bool = True, normalise: bool = True) -> str | None:
    """The final numeric answer in a GSM8K solution or a model's generation.

    The number after the last `####` if there is one; else the number after the last "The answer is"
    (case-insensitive); else (with `last_number`) the last number in the text. A marker followed by no number falls
    through to the next rule. The sign is kept (also "$-5" / "-$5"), a leading "+" dropped, thousands separators
    removed, and "$", "%" and a trailing period ignored.

    Args:
        text: the solution or generation (None gives None).
        last_number: fall back to the last number in the text when no marker is followed by one (a model's
            generation); False reads a marked answer only (gold answers in training data).
        normalise: write the number in one canonical form ("3.50" -> "3.5", "18.00" -> "18", "+7" -> "7"); False
            keeps its digits as written, less the thousands separators ("3.50", "-1000").

    Returns:
        A numeric string ("1,000" -> "1000"), or None when there is no such number.
    """
    if not text:
        return None
    write = _normalise if normalise else _as_written
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found is not None:
            return write(found)
    markers = list(_ANSWER_IS.finditer(text))
    if markers:
        found = _NUMBER.search(text[markers[-1].end():])
        if found is not None:
            return write(found)
    if not last_number:
        return None
    matches = list(_NUMBER.finditer(text))
    return write(matches[-1]) if matches else None
