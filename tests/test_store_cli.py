"""`ragkit cache stats/clear` on a synthetic cache folder, and `ragkit bench store` (fast: no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chunk_cache.disk import MANIFEST
from chunk_cache.store import KVStore
from ragkit.cli import app
from tests.test_store import MODEL, entry_path, flip_byte, make_key, make_kv

runner = CliRunner()


@pytest.fixture
def cache_config(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "kv"
    cfg = tmp_path / "pipe.toml"
    cfg.write_text(f'name = "pipe"\n[cache]\ndir = "{root}"\ndisk_bytes = 1000000\n')
    return cfg, root


def test_stats_on_a_missing_cache(cache_config):
    cfg, root = cache_config
    result = runner.invoke(app, ["cache", "stats", str(cfg)])
    assert result.exit_code == 0 and result.stdout.strip() == f"no KV cache at {root}"
    assert runner.invoke(app, ["cache", "clear", str(cfg)]).stdout.strip() == f"no KV cache at {root}"


def test_stats_reports_entries_hits_and_verifies(cache_config):
    cfg, root = cache_config
    store = KVStore(root, MODEL)
    for n in range(3):
        store.put(make_key(n), make_kv(n), recompute_cost_s=0.25 * n)
    for _ in range(4):
        store.get(make_key(2))
    store.flush()
    info = json.loads(runner.invoke(app, ["cache", "stats", str(cfg), "--json"]).stdout)
    assert (list(info["models"]), info["entries"], info["hits"], info["budget"]) == ([MODEL], 3, 4, 1000000)
    assert info["models"][MODEL] == {"entries": 3, "bytes": info["bytes"], "hits": 4, "dtypes": ["float32"]}
    assert info["top"][0]["digest"] == make_key(2).digest() and info["top"][0]["cost_s"] == 0.5
    text = runner.invoke(app, ["cache", "stats", str(cfg)]).stdout
    assert f"model {MODEL}" in text and "entries 3" in text and make_key(2).digest()[:16] in text
    flip_byte(entry_path(root, make_key(1)), 2)
    result = runner.invoke(app, ["cache", "stats", str(cfg), "--verify"])
    assert result.exit_code == 0 and "verified: 2 ok, 1 dropped (1 checksum)" in result.stdout
    assert not entry_path(root, make_key(1)).exists()


def test_clear_removes_any_models_cache_and_refuses_foreign_folders(cache_config, tmp_path):
    cfg, root = cache_config
    KVStore(root, "some-other-model").put(make_key(0, model="some-other-model"), make_kv(0))
    result = runner.invoke(app, ["cache", "clear", str(cfg)])
    assert result.exit_code == 0 and result.stdout.startswith("removed 1 entries (") and str(root) in result.stdout
    assert not (root / MANIFEST).exists()
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / MANIFEST).write_text('{"app": "not ragkit"}')
    result = runner.invoke(app, ["cache", "clear", str(cfg), "--set", f"cache.dir={foreign}"])
    assert result.exit_code == 2 and "not a ragkit KV cache manifest" in result.stderr
    assert (foreign / MANIFEST).exists()


def test_bad_config_exits_2(cache_config):
    cfg, _ = cache_config
    result = runner.invoke(app, ["cache", "stats", str(cfg), "--set", "cache.disk_bytes=-1"])
    assert result.exit_code == 2 and "cache.disk_bytes" in result.stderr


def test_bench_store_measures_each_length(tmp_path):
    result = runner.invoke(app, ["bench", "store", "--tokens", "8", "--entries", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["dtype"], r["tokens"]) for r in rows] == [("float32", 8), ("bfloat16", 8)]
    tensor_bytes = 2 * 30 * 3 * 8 * 64  # keys + values elements
    assert rows[0]["entry_bytes"] > 4 * tensor_bytes and rows[1]["entry_bytes"] > 2 * tensor_bytes
    assert all(r["disk_get_ms"] > 0 and r["sha256_ms"] > 0 for r in rows)


@pytest.mark.parametrize("modes, problem", [("full,magic", "unknown mode 'magic'"),
                                            ("blend@1.5", "@R (a share in [0, 1]) is for blend"),
                                            ("craft@0.2", "@R (a share in [0, 1]) is for blend"),
                                            ("blend@40t", "@Nt (rows) for query")])
def test_bench_cache_refuses_bad_modes_before_loading_anything(modes, problem):
    result = runner.invoke(app, ["bench", "cache", "--modes", modes, "--limit", "1"])
    assert result.exit_code == 2 and problem in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: --modes")
