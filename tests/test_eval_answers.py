"""Answer metrics (hand-computed) and the cache metrics that share results.json with them."""

from __future__ import annotations

import pytest

from eval.answers import (exact_match, normalize_answer, rouge_l, score_answers, token_f1, yes_no_accuracy,
                          yes_no_maybe)
from eval.generation import cache_metrics, merge_scores, score_generation
from ragkit.errors import ConfigError


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Beatles.", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def test_token_f1_hand_computed():
    # prediction tokens: barack obama president; gold: obama -> P = 1/3, R = 1, F1 = 0.5
    assert token_f1("Barack Obama, president", ["Obama"]) == pytest.approx(0.5)
    # best over golds: "george bush" shares nothing, "president obama" shares 2 of 3 / 2 of 2 -> 0.8
    assert token_f1("Barack Obama, president", ["George Bush", "President Obama"]) == pytest.approx(0.8)
    assert token_f1("a an the", ["the"]) == 1.0   # both normalise to empty
    assert token_f1("", ["Obama"]) == 0.0
    assert token_f1("Obama", []) == 0.0


def test_yes_no_maybe():
    assert yes_no_maybe("Yes, because the trial showed it.") == "yes"
    assert yes_no_maybe("It is unclear") is None
    assert yes_no_accuracy("Maybe.", "maybe") == 1.0
    assert yes_no_accuracy("No", "yes") == 0.0
    assert yes_no_accuracy("unclear", "no") == 0.0


def test_rouge_l_hand_computed():
    # LCS("police killed the gunman", "the gunman was killed by police") over normalised tokens:
    # pred = police killed gunman (3), gold = gunman was killed by police (5); LCS = "killed" or
    # "gunman" or "police" -> 1; P = 1/3, R = 1/5, F = 2PR/(P+R) = 0.25
    assert rouge_l("police killed the gunman", ["the gunman was killed by police"]) == pytest.approx(0.25)
    # pred = w x y z, gold = w y z -> LCS 3: P = 3/4, R = 1, F = 6/7
    assert rouge_l("w x y z", ["w y z"]) == pytest.approx(6 / 7)
    assert rouge_l("nothing shared", ["w y z"]) == 0.0


def test_score_answers_counts_missing_predictions_as_zero():
    aggregate, per_query = score_answers({"q1": "Paris"}, {"q1": ["Paris"], "q2": ["Rome"], "q3": []},
                                         ["em", "f1", "rouge_l"])
    assert set(per_query) == {"q1", "q2"}  # q3 has no gold answer: not scored
    assert per_query["q2"] == {"em": 0.0, "f1": 0.0, "rouge_l": 0.0}
    assert aggregate == {"em": 0.5, "f1": 0.5, "rouge_l": 0.5}
    with pytest.raises(ConfigError, match="bleu"):
        score_answers({}, {}, ["bleu"])


def test_cache_metrics_join_answer_metrics_per_query():
    records = {
        "q1": {"text": "Paris", "ttft_s": 0.2, "recomputed_tokens": 30, "context_tokens": 200, "kl": 0.01,
               "agreement": 1.0},
        "q2": {"text": "Milan", "ttft_s": 0.4, "recomputed_tokens": 0, "context_tokens": 100},
    }
    aggregate, per_query = score_generation(records, {"q1": ["Paris"], "q2": ["Rome"]}, ["em"])
    assert per_query["q1"] == {"em": 1.0, "ttft_s": 0.2, "recompute_share": 0.15, "kl": 0.01, "agreement": 1.0}
    assert per_query["q2"] == {"em": 0.0, "ttft_s": 0.4, "recompute_share": 0.0}
    assert aggregate["ttft_s"] == pytest.approx(0.3)
    assert aggregate["recompute_share"] == pytest.approx(0.075)
    assert aggregate["kl"] == 0.01  # averaged over the queries where it was measured
    assert aggregate["ttft_p50_s"] == pytest.approx(0.3)
    assert cache_metrics({}) == ({}, {})
    merged = merge_scores(({"ndcg@10": 0.5}, {"q1": {"ndcg@10": 0.5}}), (aggregate, per_query))
    assert merged[1]["q1"]["ndcg@10"] == 0.5 and merged[1]["q1"]["em"] == 1.0 and "q2" in merged[1]
