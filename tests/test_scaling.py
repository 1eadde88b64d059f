"""Every parser entry point costs time linear in what the sender controls (issue 14, class 2).

Each check builds the same construct at n and at 4n and compares the CPU time of the two:
a linear path costs about 4x, a quadratic one 16x.  The bar is 8x, a wide margin both
ways; n grows until the small case takes long enough to time.  No absolute times.
The same entry points with figures: ``bench/hostile.py scaling``.
"""

from __future__ import annotations

import pytest

from support.costly import ENTRY_POINTS, cpu_seconds

LINEAR_AT_MOST = 8.0
LONG_ENOUGH = 0.02          # seconds of CPU for the small case


@pytest.mark.parametrize("name, action, build, n", ENTRY_POINTS, ids=[entry[0] for entry in ENTRY_POINTS])
def test_the_same_construct_four_times_larger_costs_about_four_times_as_much(name, action, build, n):
    small = cpu_seconds(action, build(n))
    while small < LONG_ENOUGH and n < 10 ** 8:
        n *= 4
        small = cpu_seconds(action, build(n))
    large = cpu_seconds(action, build(4 * n))
    assert large / small <= LINEAR_AT_MOST, f"{name}: n={n} took {small:.4f} s, 4n {large:.4f} s"
