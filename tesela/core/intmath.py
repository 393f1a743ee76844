"""Integer helpers for host code: launch grids, block sizes, split counts.

Triton's `triton.cdiv` and `triton.next_power_of_2` are constexpr functions: called from Python
they go through Triton's wrapper, several microseconds each (about 6 us on a 2-core CI host),
and a decode step's planning called them on every replay. Host code uses these instead
(tests/test_intmath.py keeps it so).
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
