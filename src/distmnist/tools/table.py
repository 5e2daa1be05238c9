"""The plain-text tables the tools print (distmnist bench, distmnist compare)."""

from __future__ import annotations


def text_table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """`head` over `rows` in columns two spaces apart, a dashed line under the head; the first `left` columns
    aligned left (names), the others right (numbers)."""
    lines = [head, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
