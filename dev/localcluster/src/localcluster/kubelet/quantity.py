"""Kubernetes resource quantities ("500m", "16Gi", "1e3") as exact fractions."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_SUFFIX = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")


def parse_quantity(value: Any) -> Fraction:
    """Parse a quantity; raises ValueError naming the bad value."""
    if isinstance(value, int | float):
        return Fraction(value)
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"quantities must match the regular expression '{_QUANTITY.pattern}': {value!r}")
    number, exponent, suffix = match.groups()
    try:
        base = Fraction(number)
    except ValueError:
        raise ValueError(f"quantities must be a number with an optional suffix: {value!r}") from None
    if exponent:
        return base * Fraction(10) ** int(exponent[1:])
    return base * _SUFFIX[suffix or ""]


def format_cpu(value: Fraction) -> str:
    return str(int(value)) if value == int(value) else f"{int(value * 1000)}m"


def pod_requests(spec: dict[str, Any]) -> dict[str, Fraction]:
    """Effective requests: max(sum over containers, any init container) + overhead; limits stand in for
    missing requests, as the API server's defaulting does."""

    def of(container: dict[str, Any]) -> dict[str, Fraction]:
        res = container.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {k: parse_quantity(v) for k, v in merged.items()}

    total: dict[str, Fraction] = {}
    for container in spec.get("containers") or []:
        for key, amount in of(container).items():
            total[key] = total.get(key, Fraction(0)) + amount
    for container in spec.get("initContainers") or []:
        for key, amount in of(container).items():
            total[key] = max(total.get(key, Fraction(0)), amount)
    for key, amount in (spec.get("overhead") or {}).items():
        total[key] = total.get(key, Fraction(0)) + parse_quantity(amount)
    return total
