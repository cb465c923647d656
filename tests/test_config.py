from pathlib import Path

import pytest

from ragkit.config import load_config, parse_overrides
from ragkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert configs, "configs/ is empty"
    for path in configs:
        cfg = load_config(path)
        assert cfg.name == path.stem
        assert cfg.dataset_path().exists(), f"{path.name}: dataset path {cfg.dataset_path()} is missing"


def test_defaults_and_relative_dataset_path(tmp_path):
    cfg = load_config(write(tmp_path, '[dataset]\npath = "data/x"\n'))
    assert cfg.name == "p"
    assert cfg.dataset_path() == tmp_path / "data/x"
    assert cfg.retrieval.retrievers == [{"type": "bm25"}]
    assert cfg.index_dir() == Path("indexes/p")


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "[retrieval]\nkk = 3\n"))
    assert "retrieval.kk" in str(err.value) and "chunk_k" in str(err.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="'retriever'"):
        load_config(write(tmp_path, "[retriever]\nk = 3\n"))


def test_bad_choice_lists_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[cache]\nmode = "magic"\n'))
    assert "cache.mode" in str(err.value) and "blend" in str(err.value)


def test_bad_type_and_range(tmp_path):
    with pytest.raises(ConfigError, match="retrieval.k"):
        load_config(write(tmp_path, '[retrieval]\nk = "many"\n'))
    with pytest.raises(ConfigError, match="chunking.size"):
        load_config(write(tmp_path, "[chunking]\nsize = 0\n"))
    with pytest.raises(ConfigError, match="cache.primer_passages.*>= 0"):
        load_config(write(tmp_path, "[cache]\nprimer_passages = -1\n"))
    with pytest.raises(ConfigError, match="cache.primer_passages.*int"):
        load_config(write(tmp_path, '[cache]\nprimer_passages = "one"\n'))


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, "[dataset\n")
    with pytest.raises(ConfigError, match="p.toml"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope/missing.toml")


def test_overrides_coerce_and_validate(tmp_path):
    path = write(tmp_path, "[retrieval]\nk = 10\n")
    cfg = load_config(path, parse_overrides(["retrieval.k=50", "dataset.title=false", "cache.ratio=0.3"]))
    assert cfg.retrieval.k == 50 and cfg.dataset.title is False and cfg.cache.ratio == 0.3
    with pytest.raises(ConfigError, match="retrieval.nope"):
        load_config(path, parse_overrides(["retrieval.nope=1"]))
    with pytest.raises(ConfigError):
        parse_overrides(["retrieval.k"])


def test_several_retrievers_need_fusion(tmp_path):
    text = '[retrieval]\nretrievers = [{type = "bm25"}, {type = "dense"}]\n'
    with pytest.raises(ConfigError, match="retrieval.fusion"):
        load_config(write(tmp_path, text))
    cfg = load_config(write(tmp_path, text + 'fusion = "rrf"\n'))
    assert cfg.retrieval.fusion == "rrf"


def test_fingerprint_tracks_index_settings_only(tmp_path):
    a = load_config(write(tmp_path, "[chunking]\nsize = 256\n"))
    b = load_config(tmp_path / "p.toml", parse_overrides(["eval.runs_dir=elsewhere"]))
    c = load_config(tmp_path / "p.toml", parse_overrides(["chunking.size=128"]))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
