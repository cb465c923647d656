"""Pipeline configuration: one TOML file, validated on load.

Every section is a dataclass; an unknown key or a bad value raises ConfigError naming the
dotted key and the allowed values. Paths in `[dataset]` are relative to the config file;
output folders (`index_dir`, `runs_dir`) are relative to the working directory.
CLI overrides use the same dotted keys: `--set retrieval.k=50`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from chunk_cache.dtypes import GENERATOR_DTYPES
from chunk_cache.eviction import POLICIES
from chunk_cache.modes import MODES, ReuseSettings
from generators.choices import NORMS
from ragkit.errors import ConfigError

DATASET_FORMATS = ["beir", "jsonl", "textdir", "bright", "coir"]
PROTOCOLS = ["beir", "bright", "coir"]
FUSIONS = ["none", "rrf", "weighted"]
NORMALIZATIONS = ["minmax", "zscore"]
BACKENDS = ["local", "ray"]
GENERATOR_BACKENDS = ["local", "openai"]
EXPANSIONS = ["none", "reason", "hyde", "query2doc"]
LLM_BACKENDS = ["local", "openai"]
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, key: str, source: str | None = None) -> int:
    """"4GiB", "512 MB", "2000000000" -> bytes; anything else is a ConfigError naming `key`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(key, f'expected a size such as "4GiB" or "512MB", got {text!r}', source=source)
    value = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    if value < 2**20:
        raise ConfigError(key, f"must be at least 1MiB, got {text!r}", source=source)
    return int(value)


@dataclass
class DatasetConfig:
    format: str = "beir"
    path: str = ""
    split: str = "test"
    # BRIGHT: domain is the HF split (biology, ...); long_documents switches corpus and gold ids.
    domain: str = ""
    long_documents: bool = False
    # CoIR task name (cosqa, apps, ...), used with a Hugging Face or local copy.
    task: str = ""
    # Prepend the title to the indexed text (BEIR: yes; CoIR: no).
    title: bool = True
    limit_queries: int = 0


@dataclass
class ChunkingConfig:
    size: int = 512
    overlap: int = 64
    # "generator" uses the generator's tokenizer; otherwise a local HF tokenizer folder.
    tokenizer: str = "generator"


@dataclass
class RetrievalConfig:
    k: int = 100
    # Chunk hits fetched per query before they are folded into document hits (max score).
    chunk_k: int = 1000
    # Each entry is a table with `type` (bm25, dense, hnsw, ivf, ivfpq) and its parameters;
    # retrievers.build validates the parameters of each type.
    retrievers: list[dict[str, Any]] = field(default_factory=lambda: [{"type": "bm25"}])
    fusion: str = "none"
    rrf_k: int = 60
    weights: list[float] = field(default_factory=list)
    normalization: str = "minmax"
    index_dir: str = ""


@dataclass
class GeneratorConfig:
    # "smollm2" (bundled), a local Hugging Face folder, or a .gguf file.
    model: str = "smollm2"
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    chunks: int = 5
    system_prompt: str = "Answer the question using the documents. Reply with a short answer only."
    device: str = "auto"
    # "auto": bfloat16 on CUDA, float32 on CPU; float32 on CUDA reproduces the CPU figures exactly.
    dtype: str = "auto"
    # Closed-form answers (e.g. ["yes", "no"]): each choice is scored by its log-likelihood after the prompt
    # and the best is the answer; a query's own `choices` field wins. Empty: free generation.
    choices: list[str] = field(default_factory=list)
    # What the best choice maximises: "none" the total log-likelihood, "tokens" / "chars" it per token / character.
    choice_norm: str = "none"
    # "openai": answers come from the [llm] endpoint with full prompts (no chunk KV reuse; results say so).
    backend: str = "local"


@dataclass
class CacheConfig(ReuseSettings):  # mode (a chunk_cache.modes.MODES name), ratio, full_layers, ... and:
    dir: str = ".ragkit/kv"
    device_bytes: int = 4 << 30  # hot chunks stay on the GPU (no device tier on the CPU)
    host_bytes: int = 2 << 30
    disk_bytes: int = 20 << 30
    eviction: str = "lru"
    # Warms also store each chunk computed behind this many typical passages of the corpus, the variant reused for
    # a chunk behind other passages (chunk_cache.primer): closer to full prefill at the same recompute, twice the
    # warm. 0: one entry per chunk.
    primer_passages: int = 1
    # The recompute share (`ratio`) when scoring closed-form choices (generator.choices), 0: `ratio`. A yes/no
    # decision of a small model often hangs on a fraction of a nat, and reuse shifts it (BENCHMARKS.md).
    choice_ratio: float = 0.0


@dataclass
class EvalConfig:
    protocol: str = "beir"
    metrics: list[str] = field(default_factory=lambda: ["ndcg@10", "map@100", "recall@100", "mrr"])
    # Scored against the queries' gold answers when `ragkit eval` answers: em, f1, accuracy (yes/no/maybe), rouge_l.
    answer_metrics: list[str] = field(default_factory=lambda: ["em", "f1"])
    runs_dir: str = "runs"


@dataclass
class RerankConfig:
    # Each entry is a table with `type` (cross-encoder, bi-encoder, llm-pointwise, llm-listwise), `depth`
    # (how many of the previous stage's top documents it reorders) and its parameters; stages run in order
    # and retrievers.rerank validates each table.
    stages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class QueryConfig:
    # Rewrite each query before retrieval with the [llm]: "reason" (query + the LLM's reasoning about it,
    # BRIGHT's protocol), "hyde" (a hypothetical answer passage alone), "query2doc" (query + that passage).
    # Rerankers still see the original query.
    expansion: str = "none"
    max_tokens: int = 128


@dataclass
class LLMConfig:
    # "local": the [generator] model on this machine; "openai": any OpenAI-compatible endpoint (vLLM,
    # SGLang, llama.cpp's server, `ragkit serve`) at base_url. Used by query expansion, llm-listwise
    # reranking and generator.backend = "openai".
    backend: str = "local"
    base_url: str = ""
    model: str = ""
    # Name of the environment variable holding the API key (the key itself never goes in a config).
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 3
    # Expansions and LLM rerank scores, keyed by (model fingerprint or endpoint + model, prompt).
    cache_dir: str = ".ragkit/llm"


@dataclass
class IndexConfig:
    # Set (e.g. "4GiB") to build streaming: embeddings in resumable parts on disk, retrievers in
    # shards sized to fit, IVF lists on disk. Empty: every retriever is built in memory, in one piece.
    memory_budget: str = ""

    def budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget or "4GiB", "index.memory_budget")


@dataclass
class ClusterConfig:
    # "ray" builds and searches the shards on a Ray cluster (pip install -e .[ray]); "local": this process.
    backend: str = "local"
    # Ray: "auto" (a running cluster, else a new local one), "local" (always a new one), "ray://host:10001".
    address: str = "auto"
    # Shards per retriever (more when index.memory_budget needs them); > 1 also means a streaming build.
    shards: int = 1
    # Ray Data embedding: actors (each loads the model once) and GPUs per actor (0: CPU).
    embed_actors: int = 1
    gpus_per_actor: float = 0.0


@dataclass
class Config:
    name: str = "ragkit"
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # A suite: one table per task, each overriding [dataset] keys, plus an optional `name` for its
    # folder (default: domain, task or the dataset folder's name), e.g. `[[tasks]]` `domain = "biology"`.
    # Each task is indexed to indexes/<name>/<task>/ and evaluated to runs/<name>/<task>/.
    tasks: list[dict[str, Any]] = field(default_factory=list)
    # Folder the config was read from; dataset paths resolve against it.
    base_dir: str = field(default=".", metadata={"internal": True})
    # Set on each per-task config of a suite: the task's folder name.
    task: str = field(default="", metadata={"internal": True})
    # Whether the file (or an override) gave a [generator] section: then `ragkit eval` also answers.
    has_generator: bool = field(default=False, metadata={"internal": True})

    def dataset_path(self) -> Path:
        path = Path(self.dataset.path)
        return path if path.is_absolute() else Path(self.base_dir) / path

    def index_dir(self) -> Path:
        base = Path(self.retrieval.index_dir or f"indexes/{self.name}")
        return base / self.task if self.task else base

    def run_dir(self) -> Path:
        base = Path(self.eval.runs_dir) / self.name
        return base / self.task if self.task else base

    def task_configs(self) -> list["Config"]:
        """One single-task config per entry of `tasks` (empty when this is not a suite)."""
        return [_task_config(self, i, spec) for i, spec in enumerate(self.tasks)]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        data.pop("task")
        data.pop("has_generator")
        return data

    def sharded(self) -> bool:
        """Whether `ragkit index` builds the streaming, sharded layout (retrievers.shards)."""
        return bool(self.index.memory_budget) or self.cluster.backend == "ray" or self.cluster.shards > 1

    def fingerprint(self) -> str:
        """Hash of the settings that decide an index's content."""
        relevant = {"dataset": dataclasses.asdict(self.dataset), "chunking": dataclasses.asdict(self.chunking),
                    "retrievers": self.retrieval.retrievers}
        if self.sharded():  # shard count and backend do not change what a search returns
            relevant["layout"] = "sharded"
        relevant["dataset"].pop("limit_queries")
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_CHOICES = {
    "dataset.format": DATASET_FORMATS,
    "retrieval.fusion": FUSIONS,
    "retrieval.normalization": NORMALIZATIONS,
    "cache.mode": list(MODES),
    "cache.eviction": list(POLICIES),
    "generator.dtype": list(GENERATOR_DTYPES),
    "generator.choice_norm": list(NORMS),
    "eval.protocol": PROTOCOLS,
    "cluster.backend": BACKENDS,
    "generator.backend": GENERATOR_BACKENDS,
    "query.expansion": EXPANSIONS,
    "llm.backend": LLM_BACKENDS,
}

_POSITIVE = {"chunking.size", "retrieval.k", "retrieval.chunk_k", "generator.max_new_tokens", "generator.chunks",
             "cluster.shards", "cluster.embed_actors", "query.max_tokens", "llm.concurrency", "llm.timeout"}
_NON_NEGATIVE = {"chunking.overlap", "dataset.limit_queries", "cache.full_layers", "cache.ratio", "cache.choice_ratio",
                 "cache.primer_passages", "cache.epic_tokens", "cache.recompute_tokens", "cache.device_bytes", "cache.host_bytes", "cache.disk_bytes",
                 "generator.temperature", "cluster.gpus_per_actor", "llm.retries"}


def _coerce(key: str, value: Any, typ: Any, source: str | None) -> Any:
    origin = getattr(typ, "__origin__", None)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            item = typ.__args__[0]
            if item in (int, float, str):
                return [_coerce(f"{key}[{i}]", v, item, source) for i, v in enumerate(value)]
            return value
    type_name = getattr(typ, "__name__", str(typ))
    raise ConfigError(key, f"expected {type_name}, got {value!r}", source=source)


def _fill(section_obj: Any, values: dict[str, Any], prefix: str, source: str | None) -> None:
    hints = get_type_hints(type(section_obj))
    fields = {f.name: f for f in dataclasses.fields(section_obj) if not f.metadata.get("internal")}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(dotted, "unknown key", allowed=sorted(fields), source=source)
        current = getattr(section_obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(dotted, "expected a table", source=source)
            _fill(current, value, f"{dotted}.", source)
            continue
        setattr(section_obj, key, _coerce(dotted, value, hints[key], source))


def _task_config(cfg: Config, position: int, spec: Any, source: str | None = None) -> Config:
    key = f"tasks[{position}]"
    if not isinstance(spec, dict):
        raise ConfigError(key, 'each task is a table of [dataset] keys, e.g. { domain = "biology" }', source=source)
    sub = copy.deepcopy(cfg)
    sub.tasks = []
    _fill(sub.dataset, {k: v for k, v in spec.items() if k != "name"}, f"{key}.", source)
    sub.task = str(spec.get("name") or sub.dataset.domain or sub.dataset.task or Path(sub.dataset.path).name)
    if not sub.task or sub.task in (".", "..") or "/" in sub.task or "\\" in sub.task:
        raise ConfigError(f"{key}.name", f"needs a folder name without slashes, got {sub.task!r}", source=source)
    _check(sub, source)
    return sub


def _check(cfg: Config, source: str | None) -> None:
    if not cfg.name or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name:
        raise ConfigError("name", f"needs a folder name without slashes (it names runs/<name> and "
                          f"indexes/<name>), got {cfg.name!r}", source=source)
    labels: dict[str, int] = {}
    for position, spec in enumerate(cfg.tasks):
        label = _task_config(cfg, position, spec, source).task
        if label in labels:
            raise ConfigError(f"tasks[{position}]", f"task folder {label!r} is also tasks[{labels[label]}]; "
                              "give one of them a distinct `name`", source=source)
        labels[label] = position
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(key, f"unknown value {value!r}", allowed=allowed, source=source)
    for key in _POSITIVE | _NON_NEGATIVE:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in _POSITIVE and value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}", source=source)
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}", source=source)
    if cfg.chunking.overlap >= cfg.chunking.size:
        raise ConfigError("chunking.overlap", f"must be smaller than chunking.size ({cfg.chunking.size})",
                          source=source)
    if cfg.index.memory_budget:
        parse_bytes(cfg.index.memory_budget, "index.memory_budget", source)
    address = cfg.cluster.address
    if address not in ("auto", "local") and not re.fullmatch(r"(ray://)?[\w.-]+:\d+", address):
        raise ConfigError("cluster.address", f'expected "auto", "local", "ray://host:port" or "host:port", '
                          f"got {address!r}", source=source)
    _check_choices(cfg.generator.choices, source)
    for key in ("ratio", "choice_ratio"):
        if getattr(cfg.cache, key) > 1:
            raise ConfigError(f"cache.{key}", f"must be in [0, 1], got {getattr(cfg.cache, key)}", source=source)
    _check_metrics(cfg, source)
    if not cfg.retrieval.retrievers:
        raise ConfigError("retrieval.retrievers", "needs at least one retriever", source=source)
    for i, spec in enumerate(cfg.retrieval.retrievers):
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"retrieval.retrievers[{i}]", "each retriever needs a 'type'", source=source)
    if len(cfg.retrieval.retrievers) > 1 and cfg.retrieval.fusion == "none":
        raise ConfigError("retrieval.fusion", "several retrievers need a fusion method",
                          allowed=["rrf", "weighted"], source=source)
    if cfg.retrieval.weights and len(cfg.retrieval.weights) != len(cfg.retrieval.retrievers):
        raise ConfigError("retrieval.weights", "needs one weight per retriever", source=source)
    if cfg.rerank.stages:
        from retrievers.rerank import check_stages

        check_stages(cfg.rerank.stages, source)
    uses_endpoint = cfg.llm.backend == "openai" or cfg.generator.backend == "openai"
    if uses_endpoint and not re.fullmatch(r"https?://\S+", cfg.llm.base_url):
        raise ConfigError("llm.base_url", f"an OpenAI-compatible endpoint needs a URL such as "
                          f"http://127.0.0.1:8000/v1, got {cfg.llm.base_url!r}", source=source)


def _check_choices(choices: list[str], source: str | None) -> None:
    """Each choice has text, and no two are the same answer once normalised (gold answers are matched so)."""
    from eval.answers import normalize_answer

    seen: dict[str, int] = {}
    for n, choice in enumerate(choices):
        if not choice.strip():
            raise ConfigError(f"generator.choices[{n}]", "is empty: a choice needs text", source=source)
        key = normalize_answer(choice)
        if key in seen:
            raise ConfigError(f"generator.choices[{n}]", f"{choice!r} is the same answer as choice {seen[key]} "
                              "once normalised (case, punctuation, articles)", source=source)
        seen[key] = n


def check_modes(names: str | list[str] | tuple[str, ...], key: str = "cache.mode") -> list[str]:
    """Reuse-mode names (a list, or a comma-separated string) checked against the registry (chunk_cache.modes)."""
    names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
    for name in names:
        if name not in MODES:
            raise ConfigError(key, f"unknown mode {name!r}", allowed=list(MODES))
    return names


MODE_NAMES = tuple(MODES)  # the registry's names, for callers that must not import chunk_cache


def _check_metrics(cfg: Config, source: str | None) -> None:
    """Retrieval metrics by eval.retrieval's grammar, answer metrics by eval.answers' list: checked on load,
    before any index is built or answer generated."""
    from eval.answers import METRICS as ANSWER_METRICS
    from eval.retrieval import parse_metric

    for name in cfg.eval.metrics:
        try:
            parse_metric(name)
        except ConfigError as exc:
            raise ConfigError(*exc._args[:3], source=source) from None
    unknown = [m for m in cfg.eval.answer_metrics if m not in ANSWER_METRICS]
    if unknown:
        raise ConfigError("eval.answer_metrics", f"unknown answer metrics {unknown}", allowed=sorted(ANSWER_METRICS),
                          source=source)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['retrieval.k=50', ...] into a nested dict of strings (coerced on load)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(pair, "an override looks like section.key=value")
        key, value = pair.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "cannot set a key inside a value")
        node[parts[-1]] = value.strip()
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(data: dict[str, Any], base_dir: str | Path = ".", source: str | None = None) -> Config:
    cfg = Config(base_dir=str(base_dir), has_generator="generator" in data)
    _fill(cfg, data, "", source)
    _check(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read, merge CLI overrides into, and validate one TOML pipeline file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"not valid TOML: {exc}", source=path) from None
    data.setdefault("name", path.stem)
    if overrides:
        data = _merge(data, overrides)
    return from_dict(data, base_dir=path.resolve().parent, source=str(path))
