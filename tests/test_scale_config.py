"""`[index]` and `[cluster]` keys: bad values name the key (exit 2); a sharded index swaps in for eval."""

from __future__ import annotations

import pytest

from ragkit.config import from_dict
from tests.test_bad_inputs import assert_user_error, invoke, write_config, write_dataset


@pytest.mark.parametrize("override,needles", [
    ("index.memory_budget=lots", ["'index.memory_budget'", 'expected a size such as "4GiB"']),
    ("index.memory_budget=12KiB", ["'index.memory_budget'", "at least 1MiB"]),
    ("cluster.backend=dask", ["'cluster.backend'", "allowed: local, ray"]),
    ("cluster.address=somewhere", ["'cluster.address'", '"ray://host:port"']),
    ("cluster.shards=0", ["'cluster.shards'", "must be > 0"]),
    ("cluster.gpus_per_actor=-1", ["'cluster.gpus_per_actor'", "must be >= 0"]),
])
def test_bad_scale_keys_name_the_key(tmp_path, override, needles):
    write_dataset(tmp_path / "data")
    assert_user_error(invoke("index", write_config(tmp_path), "--quiet", "--set", override), *needles)
    assert not (tmp_path / "index").exists()


def test_sharded_layout_is_part_of_the_index_identity_but_backend_and_shard_count_are_not():
    plain, two, four = (from_dict(d) for d in ({}, {"cluster": {"shards": 2}}, {"cluster": {"shards": 4}}))
    on_ray = from_dict({"cluster": {"backend": "ray", "address": "ray://head:10001"}})
    budget = from_dict({"index": {"memory_budget": "2GiB"}})
    assert not plain.sharded() and two.sharded() and on_ray.sharded() and budget.sharded()
    assert plain.fingerprint() != two.fingerprint() == four.fingerprint() == on_ray.fingerprint()
    assert budget.index.budget_bytes() == 2 << 30 and plain.index.budget_bytes() == 4 << 30


def test_sharded_index_then_eval_and_query_through_the_cli(tmp_path):
    write_dataset(tmp_path / "data")
    config = write_config(tmp_path, extra="[cluster]\nshards = 2\n[index]\nmemory_budget = \"64MiB\"")
    assert invoke("index", config, "--quiet").exit_code == 0
    assert (tmp_path / "index" / "retriever-0" / "shards.json").is_file()
    result = invoke("eval", config, "--quiet")
    assert result.exit_code == 0, result.output
    (tmp_path / "plain").mkdir()
    write_dataset(tmp_path / "plain" / "data")
    plain = write_config(tmp_path / "plain")
    assert invoke("eval", plain, "--quiet").exit_code == 0
    assert result.stdout.splitlines()[0] == invoke("eval", plain, "--quiet").stdout.splitlines()[0]


def test_ray_backend_without_ray_is_one_line(tmp_path, monkeypatch):
    import retrievers.ray_backend as ray_backend

    monkeypatch.setattr(ray_backend, "ray", None)
    write_dataset(tmp_path / "data")
    assert_user_error(invoke("index", write_config(tmp_path, extra='[cluster]\nbackend = "ray"'), "--quiet"),
                      "'cluster.backend'", 'pip install -e ".[ray]"')


def test_config_error_survives_pickling_as_builds_in_child_processes_raise_it():
    import pickle

    from ragkit.errors import ConfigError

    error = ConfigError("retrieval.retrievers[0].m", "must divide 384, got 50", allowed=[48, 96], source="a.toml")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is ConfigError and str(back) == str(error) and back.key == error.key
