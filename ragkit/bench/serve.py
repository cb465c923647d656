"""`ragkit bench serve`: open-loop load against a `ragkit serve` that this bench starts itself.

The server answers from one BM25 index over SciFact's abstracts and the MuSiQue sample's
passages (built once under the work folder). Requests arrive as a Poisson process at each rate;
each asks a question drawn Zipf-popular from SciFact's test queries and MuSiQue's questions, so
popular questions, and their chunks, recur. One fresh server per reuse mode (memory-only KV
cache, so every mode starts cold), rates in increasing order on it.

Bounded by construction: the server binds 127.0.0.1 only, each rate sends at most
`max_requests` requests over at most `duration_s`, each request is cut by the server's deadline,
and a point waits at most deadline + 30 s for its stragglers.

Measured per (mode, rate), at the client: throughput (answers per second from first send to
last answer), TTFT p50/p90/p99 (send to first streamed token), answers, 429s, errors (anything
else), chunk hit rate (from the answers' figures). Per mode: the knee, the highest rate whose p90
TTFT stays under twice the lowest rate's; after the highest rate, how long until a lone request's
TTFT is back within twice the lowest rate's p50 (recovery_s); the server's peak RSS.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx

ROOT = Path(__file__).resolve().parents[2]
SCIFACT = ROOT / "data" / "scifact"
MUSIQUE = ROOT / "data" / "musique" / "musique_s.json.gz"


@dataclass
class ServeBenchSettings:
    rates: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    modes: list[str] = field(default_factory=lambda: ["full", "prefix", "blend"])
    duration_s: float = 120.0
    max_requests: int = 500
    k: int = 3
    chunk_size: int = 256
    max_tokens: int = 8
    queue: int = 32
    deadline_s: float = 120.0
    zipf: float = 1.0
    recovery: bool = True
    threads: int = 0  # the server's CPU threads (0: torch's default)
    questions: int = 0  # pool size: the first N of the shuffled pool (0: all 450)
    slo_s: float = 10.0
    seed: int = 0
    workdir: Path = Path(".ragkit/bench-serve")


def run(settings: ServeBenchSettings, log: Callable[[str], None]) -> dict:
    config, questions = prepare(settings.workdir, settings.chunk_size, log)
    rng = random.Random(settings.seed)
    rng.shuffle(questions)  # popularity rank independent of the source order
    questions = questions[:settings.questions or None]
    modes = {}
    for mode in settings.modes:
        log(f"mode {mode}: starting a server")
        modes[mode] = _bench_mode(config, questions, mode, settings, log)
    return _summary(modes, settings, len(questions))


# -- the workload --------------------------------------------------------------------------------

def prepare(workdir: Path, chunk_size: int, log: Callable[[str], None]) -> tuple[Path, list[str]]:
    """One JSONL corpus (SciFact abstracts + MuSiQue passages), its config and BM25 index; the question pool."""
    from ragkit.pipeline import Pipeline
    from ragkit.readers.musique import read_musique

    corpus = workdir / "corpus" / "corpus.jsonl"
    samples = read_musique(MUSIQUE)
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        tmp = corpus.with_suffix(".tmp")
        with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as src, open(tmp, "w") as out:
            for line in src:
                doc = json.loads(line)
                out.write(json.dumps({"_id": f"scifact-{doc['_id']}", "title": doc.get("title", ""),
                                      "text": doc["text"]}) + "\n")
            seen = set()
            for sample in samples:
                for ctx in sample["ctxs"]:
                    if ctx["text"] not in seen:
                        out.write(json.dumps({"_id": f"musique-{len(seen)}", "title": ctx["title"],
                                              "text": ctx["text"]}) + "\n")
                        seen.add(ctx["text"])
        tmp.replace(corpus)
    config = workdir / f"serve-bench-{chunk_size}.toml"
    config.write_text(f"""# Written by `ragkit bench serve`: SciFact abstracts + MuSiQue passages, BM25, SmolLM2.
name = "serve-bench"
[dataset]
format = "jsonl"
path = "corpus"
[chunking]
size = {chunk_size}
overlap = {chunk_size // 8}
[retrieval]
index_dir = "{(workdir / 'indexes' / str(chunk_size)).resolve()}"
retrievers = [{{ type = "bm25", k1 = 0.9, b = 0.4 }}]
[generator]
model = "smollm2"
[eval]
runs_dir = "{(workdir / 'runs').resolve()}"
""")
    log("index: loading or building BM25 over SciFact + MuSiQue")
    Pipeline.from_config(config, progress=False).retrievers  # built once, reused by every server
    queries = [json.loads(line)["text"] for line in (SCIFACT / "queries.jsonl").read_text().splitlines() if line]
    return config, queries + [s["question"] for s in samples]


def zipf_picks(n_items: int, n: int, exponent: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (rank + 1) ** exponent for rank in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=n)


def poisson_arrivals(rate: float, duration_s: float, max_requests: int, rng: random.Random) -> list[float]:
    times, now = [], 0.0
    while len(times) < max_requests:
        now += rng.expovariate(rate)
        if now > duration_s:
            break
        times.append(now)
    return times


# -- one server per mode -----------------------------------------------------------------------

def _bench_mode(config: Path, questions: list[str], mode: str, s: ServeBenchSettings, log) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = open(s.workdir / f"server-{mode}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ragkit.cli", "serve", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--queue", str(s.queue), "--deadline", str(s.deadline_s), "--max-k", str(s.k), "--quiet",
         "--threads", str(s.threads),
         "--set", f"cache.mode={mode}", "--set", "cache.dir=", "--set", f"generator.chunks={s.k}",
         "--set", f"generator.max_new_tokens={s.max_tokens}"],
        stdout=logfile, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_healthy(url, 600, process)
        points = []
        rng = random.Random(s.seed)
        for rate in sorted(s.rates):
            arrivals = poisson_arrivals(rate, s.duration_s, s.max_requests, rng)
            asked = [questions[i] for i in zipf_picks(len(questions), len(arrivals), s.zipf, rng)]
            log(f"mode {mode}: {rate:g} req/s, {len(arrivals)} requests over {arrivals[-1] if arrivals else 0:.0f} s")
            point = asyncio.run(_load(url, list(zip(arrivals, asked)), s.deadline_s + 30))
            last_send = point.pop("last_send")
            points.append({"rate": rate, **point})
            log(f"  answered {point['answered']}, 429 {point['rejected']}, errors {point['errors']}, "
                f"p90 TTFT {_fmt(point['ttft_p90_s'])} s, {point['throughput_rps']:.3f} answers/s")
            if rate != max(s.rates):
                _wait_idle(url, s.deadline_s + 30)
        normal = 2 * (points[0]["ttft_p50_s"] or math.inf)
        recovery = _recovery(url, questions[0], normal, last_send, 30) if s.recovery else None
        rss = _peak_rss_gib(process.pid)
        return {"points": points, "knee_rps": _knee(points), "recovery_s": recovery, "peak_rss_gib": rss}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        logfile.close()


async def _load(url: str, schedule: list[tuple[float, str]], grace_s: float) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(grace_s), limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        tasks = []
        for at, question in schedule:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(_ask(client, url, question)))
        done, pending = await asyncio.wait(tasks, timeout=grace_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        results = [t.result() for t in done] + [{"status": "error", "why": "no answer in time"}] * len(pending)
    answered = [r for r in results if r["status"] == "ok"]
    span = max((r["finished"] for r in answered), default=0.0) - start
    ttfts = sorted(r["ttft_s"] for r in answered)
    chunks = sum(r["chunks"] for r in answered)
    errors = [r for r in results if r["status"] == "error"]
    return {"last_send": start + (schedule[-1][0] if schedule else 0.0), "sent": len(results),
            "answered": len(answered), "rejected": sum(r["status"] == "rejected" for r in results),
            "errors": len(errors), "error_examples": sorted({r["why"] for r in errors})[:3],
            "throughput_rps": len(answered) / span if span > 0 else 0.0,
            "ttft_p50_s": _pct(ttfts, 50), "ttft_p90_s": _pct(ttfts, 90), "ttft_p99_s": _pct(ttfts, 99),
            "hit_rate": sum(r["hits"] for r in answered) / chunks if chunks else 0.0}


async def _ask(client: httpx.AsyncClient, url: str, question: str) -> dict:
    sent = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", f"{url}/answer", json={"question": question, "stream": True}) as response:
            if response.status_code == 429:
                return {"status": "rejected"}
            if response.status_code != 200:
                return {"status": "error", "why": f"HTTP {response.status_code}"}
            kind = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    if kind == "token" and first is None:
                        first = time.perf_counter()
                    elif kind == "error":
                        return {"status": "error", "why": json.loads(line[6:])["error"]["message"][:80]}
                    elif kind == "done":
                        figures = json.loads(line[6:])
                        end = time.perf_counter()
                        return {"status": "ok", "ttft_s": (first or end) - sent, "finished": end,
                                "hits": figures["cache_hits"], "chunks": len(figures["chunk_ids"])}
        return {"status": "error", "why": "stream ended without an answer"}
    except httpx.HTTPError as exc:
        return {"status": "error", "why": type(exc).__name__}


# -- figures -------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _knee(points: list[dict]) -> float | None:
    """The highest rate before the server is overloaded: p90 TTFT at twice the lowest rate's, or more
    than 10% of requests failed. None: overloaded already at the lowest rate."""
    def overloaded(point: dict, base: float) -> bool:
        return point["ttft_p90_s"] is None or point["ttft_p90_s"] >= 2 * base or point["errors"] > 0.1 * point["sent"]

    knee = None
    for point in points:
        if overloaded(point, points[0]["ttft_p90_s"] or 0.0):
            break
        knee = point["rate"]
    return knee


def _summary(modes: dict, s: ServeBenchSettings, pool: int) -> dict:
    errors = sum(p["errors"] for m in modes.values() for p in m["points"])
    return {"blend_rps_vs_full_at_equal_p90": _blend_vs_full(modes, s.slo_s),
            "knee_rps_full": modes.get("full", {}).get("knee_rps"),
            "knee_rps_blend": modes.get("blend", {}).get("knee_rps"), "errors": errors,
            "peak_rss_gib": max((m["peak_rss_gib"] or 0.0 for m in modes.values()), default=None),
            "modes": modes, "settings": {**asdict(s), "workdir": str(s.workdir)}, "questions": pool,
            "machine": {"cpus": os.cpu_count()}}


def _blend_vs_full(modes: dict, slo_s: float) -> float | None:
    """At the highest rate where full keeps p90 TTFT under the SLO: blend's best throughput at a p90
    no higher than full's there, over full's throughput (None when full never meets the SLO)."""
    if "full" not in modes or "blend" not in modes:
        return None
    within = [p for p in modes["full"]["points"] if p["ttft_p90_s"] is not None and p["ttft_p90_s"] < slo_s]
    if not within:
        return None
    ref = max(within, key=lambda p: p["rate"])
    blend = [p["throughput_rps"] for p in modes["blend"]["points"]
             if p["ttft_p90_s"] is not None and p["ttft_p90_s"] <= ref["ttft_p90_s"]]
    return round(max(blend) / ref["throughput_rps"], 3) if blend and ref["throughput_rps"] > 0 else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(result: dict) -> str:
    lines = [f"{'mode':<7} {'req/s':>6} {'sent':>5} {'ok':>4} {'429':>4} {'err':>4} {'ans/s':>7} "
             f"{'p50':>7} {'p90':>7} {'p99':>7} {'hits':>6}"]
    for mode, entry in result["modes"].items():
        for p in entry["points"]:
            lines.append(f"{mode:<7} {p['rate']:>6g} {p['sent']:>5} {p['answered']:>4} {p['rejected']:>4} "
                         f"{p['errors']:>4} {p['throughput_rps']:>7.3f} {_fmt(p['ttft_p50_s']):>7} "
                         f"{_fmt(p['ttft_p90_s']):>7} {_fmt(p['ttft_p99_s']):>7} {p['hit_rate']:>6.1%}")
        lines.append(f"{mode:<7} knee {entry['knee_rps']} req/s, recovery {_fmt(entry['recovery_s'])} s, "
                     f"peak RSS {_fmt(entry['peak_rss_gib'])} GiB")
    lines.append(f"blend req/s vs full at equal p90 TTFT: {result['blend_rps_vs_full_at_equal_p90']}  "
                 f"knee full {result['knee_rps_full']}  knee blend {result['knee_rps_blend']}  "
                 f"errors {result['errors']}  peak RSS {_fmt(result['peak_rss_gib'])} GiB  (TTFT in s)")
    return "\n".join(lines)


# -- the server process ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Until GET /health answers 200; RagkitError if `process` exits first or timeout_s passes."""
    from ragkit.errors import RagkitError

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RagkitError(f"the server exited with status {process.returncode} before answering; "
                              "see its log in the bench work folder")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RagkitError(f"the server did not answer /health within {timeout_s:.0f} s")


def _wait_idle(url: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        health = httpx.get(f"{url}/health", timeout=5).json()
        if health["queue"] == 0 and health["running"] == 0:
            return
        time.sleep(0.5)


def _recovery(url: str, question: str, normal_s: float, since: float, timeout_s: float) -> float | None:
    """Seconds from the heaviest load's last request (perf_counter `since`) until a lone request's
    TTFT is back under normal_s; None if not within timeout_s of probing."""
    end = time.perf_counter() + timeout_s
    while time.perf_counter() < end:
        result = asyncio.run(_probe(url, question))
        if result["status"] == "ok" and result["ttft_s"] <= normal_s:
            return round(time.perf_counter() - since, 2)
    return None


async def _probe(url: str, question: str) -> dict:
    async with httpx.AsyncClient(timeout=120) as client:
        return await _ask(client, url, question)


def _peak_rss_gib(pid: int) -> float | None:
    """The process's high-water resident memory (Linux /proc; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / (1 << 20), 3)
    except OSError:
        return None
    return None
