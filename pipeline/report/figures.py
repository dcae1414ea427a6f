"""Numbers as a chart writes them for a person: three significant figures and a unit ("95.2 /s",
"1.25 s", "$0.0312", "12.3k tokens"), never float noise (`95.23809524`) nor an exponent to
decode (`1.23e+15`, written 1.23×10¹⁵)."""

from __future__ import annotations

import math

SUFFIXES = ("", "k", "M", "B", "T")  # thousands, millions, billions, trillions
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _placed(digits: str, power: int) -> str:
    """`digits` written out with the first of them at 10**power."""
    if power < 0:
        return "0." + "0" * (-power - 1) + digits
    if len(digits) <= power + 1:
        return digits + "0" * (power + 1 - len(digits))
    return f"{digits[: power + 1]}.{digits[power + 1 :]}"


def rounded(value: float) -> str:
    """`value` to three significant figures: 95.2, 0.0312, 12.3k, 4.5M; beyond a thousand
    trillion or under a millionth, as 1.23×10¹⁵ (rare on any chart of a run)."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    mantissa, exponent = f"{abs(value):.2e}".split("e")  # rounded once, where 999.6 becomes 1.00e+03
    digits = mantissa.replace(".", "").rstrip("0")
    power = int(exponent)  # the first digit's place
    sign = "-" if value < 0 else ""
    if not -6 <= power < 3 * len(SUFFIXES):
        return f"{sign}{_placed(digits, 0)}×10{str(power).translate(SUPERSCRIPT)}"
    group = max(power, 0) // 3
    return f"{sign}{_placed(digits, power - 3 * group)}{SUFFIXES[group]}"


def figure(value: float, unit: str = "", *, whole: bool = False) -> str:
    """`value` rounded, with its unit: "$0.0312", "95.2 /s", "12.3k tokens". `whole`: a whole
    number is written in full ("1,234 answers" at a bar's end, where the count itself is read)."""
    if whole and math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        text = f"{int(value):,}"
    else:
        text = rounded(value)
    if unit == "$":
        return f"-${text[1:]}" if text.startswith("-") else f"${text}"
    return f"{text} {unit}" if unit else text
