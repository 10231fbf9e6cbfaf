"""``key=value`` text, read in one place (stdlib only): ``--set`` overrides, a sweep's alternatives
(``rank=16,32``) and perf's method entries (``lora[rank=64,alpha=8]``).

Brackets, braces, parentheses and quotes keep a separator inside one value: ``shared_rank=[64,64,64,64]`` is
one value, ``rank=16,32`` two.
"""

from __future__ import annotations

OPENERS, CLOSERS, QUOTES = "[{(", "]})", "\"'"


def split_top_level(text: str, sep: str = ",", *, strict: bool = False) -> list[str]:
    """``text`` split at every ``sep`` outside brackets, braces, parentheses and quotes; the parts unstripped.

    ``strict``: an unbalanced bracket is a ValueError ("unbalanced ']'" / "unbalanced '['"); otherwise a stray
    closer only lowers the nesting (the separators after it then stay inside the value)."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quote, opened = 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in QUOTES:
            quote = ch
        elif ch in OPENERS:
            depth += 1
            opened.append(ch)
        elif ch in CLOSERS:
            depth -= 1
            if opened:
                opened.pop()
            if strict and depth < 0:
                raise ValueError(f"unbalanced {ch!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if strict and depth > 0:
        raise ValueError(f"unbalanced {opened[-1]!r}")
    parts.append("".join(cur))
    return parts


def split_pair(item: str, flag: str = "--set") -> tuple[str, str]:
    """``key=value`` as (stripped key, value text); a ValueError naming ``flag`` when there is no '='."""
    if "=" not in item:
        raise ValueError(f"{flag} {item!r}: expected key=value")
    key, text = item.split("=", 1)
    return key.strip(), text
