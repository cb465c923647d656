"""Answer metrics as pure functions: SQuAD EM / token F1, yes-no-maybe accuracy, ROUGE-L.

Normalisation follows the SQuAD v1.1 evaluation script's rules (lower case, drop punctuation,
drop the articles a/an/the, collapse white space); with several gold answers a prediction
gets its best score against any of them, as SQuAD, Natural Questions and MuSiQue score.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

from ragkit.errors import ConfigError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
YES_NO_MAYBE = ("yes", "no", "maybe")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        # SQuAD 2.0 convention: two empty answers agree, one empty answer scores 0.
        return float(prediction_tokens == gold_tokens)
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Iterable[str]) -> float:
    """Best bag-of-tokens F1 between the normalised prediction and any gold answer."""
    tokens = normalize_answer(prediction).split()
    return max((_f1(tokens, normalize_answer(g).split()) for g in golds), default=0.0)


def yes_no_maybe(prediction: str) -> str | None:
    """The first of yes / no / maybe the answer starts with ("Yes, because ..." -> "yes")."""
    words = normalize_answer(prediction).split()
    return words[0] if words and words[0] in YES_NO_MAYBE else None


def yes_no_accuracy(prediction: str, gold: str) -> float:
    """1.0 when the prediction's leading yes/no/maybe matches the gold label (PubMedQA-style)."""
    label = yes_no_maybe(prediction)
    return float(label is not None and label == normalize_answer(gold))


def _lcs_length(a: list[str], b: list[str]) -> int:
    # Classic dynamic programme, one row at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, golds: Iterable[str], beta: float = 1.0) -> float:
    """Best ROUGE-L F-measure (longest common subsequence of normalised tokens) over the golds."""
    tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        lcs = _lcs_length(tokens, gold_tokens)
        if lcs == 0:
            continue
        precision, recall = lcs / len(tokens), lcs / len(gold_tokens)
        best = max(best, (1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return best


METRICS = {
    "em": exact_match,
    "f1": token_f1,
    "rouge_l": rouge_l,
    "accuracy": lambda prediction, golds: yes_no_accuracy(prediction, golds[0]),
}


def check_metrics(metrics: Iterable[str]) -> list[str]:
    """The metric names, or ConfigError naming the unknown ones (checked before any answer is generated)."""
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError("eval.answer_metrics", f"unknown answer metrics {unknown}", allowed=sorted(METRICS))
    return metrics


def score_answers(predictions: dict[str, str], golds: dict[str, list[str]],
                  metrics: Iterable[str] = ("em", "f1")) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(aggregate, per_query) over every query with gold answers; a missing prediction scores 0.

    Metrics: 'em', 'f1', 'rouge_l', and 'accuracy' (yes/no/maybe against the first gold).
    """
    metrics = check_metrics(metrics)
    per_query = {}
    for qid, gold_list in golds.items():
        if not gold_list:
            continue
        prediction = predictions.get(qid, "")
        per_query[qid] = {m: METRICS[m](prediction, list(gold_list)) for m in metrics}
    aggregate = {m: (sum(v[m] for v in per_query.values()) / len(per_query) if per_query else 0.0)
                 for m in metrics}
    return aggregate, per_query
