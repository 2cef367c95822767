"""Protocol parameters: the choices that make two papers' numbers comparable or not.

Each loader takes its benchmark's variants (which gallery, whether the reference is masked,
how the texts are built) as named keyword arguments, checks them here, and writes them into
`CIRSplit.protocol`, so every results file says exactly which protocol produced it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence


def choice(name: str, value: str, options: Sequence[str]) -> str:
    """`value` if it is one of `options`; a ValueError naming the parameter otherwise."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")
    return value


def template(name: str, text: str, allowed: Sequence[str]) -> str:
    """A str.format template that uses only the `allowed` fields (checked before any record
    is read, so a typo fails at once instead of on the first query)."""
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as error:
        raise ValueError(f"{name} {text!r} is not a valid template: {error}") from None
    unknown = sorted(used - set(allowed))
    if unknown:
        raise ValueError(
            f"{name} {text!r} uses unknown field(s) {', '.join(unknown)}; "
            f"available: {', '.join('{' + a + '}' for a in allowed)}"
        )
    return text


def record(**parameters: object) -> dict[str, str]:
    """Parameters as the strings a results file stores (booleans as yes/no)."""
    return {
        key: ("yes" if value else "no") if isinstance(value, bool) else str(value)
        for key, value in parameters.items()
    }
