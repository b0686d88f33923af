"""`--optimizer_args` text: "k=v,k2=v2" with typed values.

Syntax: values are ints (10), floats (1e-4, 0.9), booleans (true/false), None (none/null), tuples in
parentheses (betas=(0.9,0.99)), or else plain strings (ns_method=newton_schulz).
"""

from __future__ import annotations

from typing import Any

from diffusers_optim.errors import UserError

CONSTANTS = {"true": True, "false": False, "none": None, "null": None}


def split_top_level(text: str, what: str = "--optimizer_args") -> list[str]:
    """Split on commas that are not inside parentheses, so `betas=(0.9,0.99)` stays one piece."""
    pieces, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise UserError(f"{what}: unbalanced ')' in '{text}'")
        elif char == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    if depth:
        raise UserError(f"{what}: unbalanced '(' in '{text}'")
    pieces.append(text[start:])
    return pieces


def parse_value(text: str) -> Any:
    """A typed value: int, float, bool, None, a tuple in parentheses, or the string itself."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        inner = text[1:-1].strip()
        return tuple(parse_value(item) for item in split_top_level(inner) if item.strip()) if inner else ()
    if text.lower() in CONSTANTS:
        return CONSTANTS[text.lower()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_optimizer_args(text: str | None) -> dict[str, Any]:
    """Parse "k=v,k2=v2" into a dict of typed values; a malformed piece is a UserError naming it."""
    if text is None or not text.strip():
        return {}
    result: dict[str, Any] = {}
    for piece in split_top_level(text):
        key, sep, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier() or not value:
            raise UserError(
                f"--optimizer_args: cannot read '{piece.strip()}': expected key=value, "
                "e.g. 'weight_decay=0.01,betas=(0.9,0.99)'"
            )
        if key in result:
            raise UserError(f"--optimizer_args: '{key}' is given twice")
        result[key] = parse_value(value)
    return result


def format_value(value: Any) -> str:
    """The --optimizer_args text that parse_value reads back as `value`."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and (parse_value(value) != value or any(c in value for c in ",()=")):
        raise UserError(f"cannot write the value {value!r} into --optimizer_args")
    return str(value)


def format_optimizer_args(values: dict[str, Any]) -> str:
    """"k=v,k2=v2" that parse_optimizer_args reads back as `values` (resolved hyperparameters into a command)."""
    return ",".join(f"{key}={format_value(value)}" for key, value in values.items())
