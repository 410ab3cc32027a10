"""scripts/bench_long_context.py's longest-row search: interpolation between the measured rows that bracket the
budget, extrapolation only past the longest, one clear error when nothing fits."""

from __future__ import annotations

import pytest

from scripts.bench_long_context import longest_row

ROWS = [{"length": 4096, "peak_mb": 1720.0}, {"length": 8192, "peak_mb": 2001.0},
        {"length": 16384, "peak_mb": 3164.0}, {"length": 32768, "peak_mb": 5488.0}]


def test_interpolates_between_the_rows_that_bracket_the_budget():
    # 3 GB lies between 8k (2,001 MB) and 16k (3,164 MB): 8192 + (3072 - 2001) / (1163 / 8192) = 15,736 → 15,616
    assert longest_row(ROWS, 3072) == 15616
    assert longest_row(list(reversed(ROWS)), 3072) == 15616  # order does not matter


def test_extrapolates_past_the_longest_row_and_refuses_a_budget_nothing_fits():
    assert longest_row(ROWS, 6144) == (32768 + int((6144 - 5488) / ((5488 - 3164) / 16384))) // 256 * 256
    with pytest.raises(RuntimeError, match="even 4096 tokens peak above the budget"):
        longest_row(ROWS, 1000)
