"""`ragkit bench serve`'s parts: bounded Poisson arrivals, Zipf popularity, the load client's
accounting against a live server, and the knee and blend-vs-full figures."""

from __future__ import annotations

import asyncio
import random
import threading
import time

from ragkit.bench.serve import _blend_vs_full, _knee, _load, poisson_arrivals, zipf_picks
from ragkit.serve import create_app
from tests.serve_fixtures import gated_server, live


def test_arrivals_are_bounded_by_count_and_duration():
    times = poisson_arrivals(2.0, 10.0, 1000, random.Random(0))
    assert times == sorted(times) and all(0 < t <= 10.0 for t in times)
    assert 8 <= len(times) <= 35  # mean 20 arrivals
    assert len(poisson_arrivals(100.0, 10.0, 7, random.Random(0))) == 7


def test_zipf_makes_the_first_questions_popular():
    picks = zipf_picks(50, 5000, 1.0, random.Random(0))
    counts = [picks.count(i) for i in range(50)]
    assert counts[0] > counts[1] > counts[10] and counts[0] > 4 * counts[9]


def test_load_counts_answers_429s_and_errors_against_a_live_server(tmp_path):
    server = gated_server(tmp_path, queue=1)
    with live(create_app(server)) as url:
        def open_when_full() -> None:  # busy at first: one runs, one waits, the other three get 429
            while not (server.scheduler.running == 1 and server.scheduler.queue_length == 1):
                time.sleep(0.01)
            time.sleep(0.5)
            server.service.gate.set()

        threading.Thread(target=open_when_full, daemon=True).start()
        point = asyncio.run(_load(url, [(0.01 * i, f"q{i}") for i in range(5)], grace_s=20))
    assert point["sent"] == 5 and point["errors"] == 0
    assert point["answered"] == 2 and point["rejected"] == 3
    assert point["ttft_p50_s"] >= 0.5 and point["throughput_rps"] > 0 and point["hit_rate"] == 0.5


def _point(rate, p90, rps, errors=0):
    return {"rate": rate, "ttft_p90_s": p90, "throughput_rps": rps, "sent": 20, "errors": errors}


def test_knee_is_the_last_rate_before_p90_doubles_or_requests_fail():
    assert _knee([_point(0.1, 1.0, 0.1), _point(0.2, 1.9, 0.2), _point(0.4, 2.0, 0.3), _point(0.8, 1.0, 0.3)]) == 0.2
    assert _knee([_point(0.1, 1.0, 0.1), _point(0.2, 1.2, 0.2, errors=3), _point(0.4, 1.0, 0.3)]) == 0.1
    assert _knee([_point(0.1, None, 0.0)]) is None


def test_blend_vs_full_compares_throughput_at_equal_p90_under_the_slo():
    modes = {"full": {"points": [_point(0.1, 4.0, 0.1), _point(0.2, 9.0, 0.15), _point(0.4, 30.0, 0.15)]},
             "blend": {"points": [_point(0.1, 1.0, 0.1), _point(0.2, 2.0, 0.2), _point(0.4, 8.0, 0.38),
                                  _point(0.8, 20.0, 0.5)]}}
    assert _blend_vs_full(modes, slo_s=10.0) == round(0.38 / 0.15, 3)  # full's reference: 0.2 req/s at p90 9 s
    assert _blend_vs_full(modes, slo_s=2.0) is None  # full never meets it
