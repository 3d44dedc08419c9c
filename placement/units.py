"""Numbers as people read them in explanations."""

from __future__ import annotations


def format_mib(mib: int) -> str:
    """4000 -> '3.9 GiB', 65536 -> '64 GiB', 512 -> '512 MiB'."""
    if abs(mib) < 1024:
        return f"{mib} MiB"
    if mib % 1024 == 0:
        return f"{mib // 1024} GiB"
    return f"{mib / 1024:.1f} GiB"


def format_page(kib: int) -> str:
    """Hugepage size: 2048 -> '2 MiB', 1048576 -> '1 GiB'."""
    if kib % (1024 * 1024) == 0:
        return f"{kib // (1024 * 1024)} GiB"
    if kib % 1024 == 0:
        return f"{kib // 1024} MiB"
    return f"{kib} KiB"


def plural(count: int, word: str, many: str | None = None) -> str:
    """plural(1, 'NIC') -> '1 NIC', plural(2, 'NIC') -> '2 NICs'."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
