"""eval.show_results tables from hand-written judgments (the last judgment of a key wins)."""

from __future__ import annotations

import pytest

from eval.show_results import latest, pairwise_table, single_table


def single(qid, model, turn, score):
    return {"question_id": qid, "model": model, "turn": turn, "score": score, "judge": ["j", "single-v1"]}


def pair(qid, m1, m2, g1, g2, turn=1):
    return {"question_id": qid, "model_1": m1, "model_2": m2, "g1_winner": g1, "g2_winner": g2, "turn": turn}


def test_single_scores_per_turn_and_category():
    records = latest([single(1, "a", 1, -1), single(1, "a", 1, 8), single(1, "a", 2, 6), single(2, "a", 1, 4),
                      single(2, "a", 2, -1), single(1, "b", 1, 10)])
    table = single_table(records, {1: "writing", 2: "math"}, None)
    assert list(table) == ["b", "a"]  # best first
    a = table["a"]
    assert a["turn 1"] == 6.0 and a["turn 2"] == 6.0 and a["overall"] == 6.0 and a["n"] == 3 and a["errors"] == 1
    assert a["categories"] == {"math": 4.0, "writing": 7.0}
    assert single_table(records, {}, ["b"]).keys() == {"b"}


def test_pairwise_wins_ties_inconsistent_errors_and_baseline():
    records = [
        pair(1, "a", "base", "model_1", "model_1"),  # a wins both orders
        pair(2, "a", "base", "model_1", "model_2"),  # position bias: inconsistent → tie
        pair(3, "a", "base", "tie", "tie"),
        pair(4, "a", "base", "model_2", "model_2"),  # base wins
        pair(5, "a", "base", "error", "model_1"),  # left out
        pair(1, "a", "b", "model_1", "model_1"),  # not a baseline game
    ]
    table = pairwise_table(records, "base", None)
    assert list(table) == ["a"]
    assert table["a"] == {"wins": 1, "losses": 1, "ties": 2, "inconsistent": 1, "errors": 1, "win_rate": 0.25,
                          "loss_rate": 0.25, "win_rate_adjusted": 0.5}
    everything = pairwise_table(records, None, None)
    assert everything["a"]["wins"] == 2 and everything["b"]["losses"] == 1 and everything["base"]["wins"] == 1
    assert everything["a"]["win_rate_adjusted"] == pytest.approx((2 + 0.5 * 2) / 5)
