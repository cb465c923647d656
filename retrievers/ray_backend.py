"""The Ray backend of sharded indexes (`[cluster] backend = "ray"`): the same build and search, on a cluster.

- `RayRunner` is the `retrievers.shards.Runner` of a cluster: every build step (BM25 statistics
  per part, BM25 / dense / IVF shards) is a Ray task; shared arguments go to the object store
  once. A task whose worker dies is retried by Ray (`max_retries`); if it still fails the build
  raises, so `ragkit index` never publishes a half-built index.
- `embed` uses Ray Data: `map_batches` with a callable class, so each of `cluster.embed_actors`
  actors loads the encoder once (with `cluster.gpus_per_actor` GPUs); batches come back in order
  and are appended to the resumable embedding store.
- `actor_pool` gives a `ShardedRetriever` one actor per shard, each holding its shard; a batch
  of queries fans out to every actor at once and the per-shard top-k are merged exactly.
Shard folders are read by path, so every node must see the index folder (one machine, or a
shared file system; see the README's scale-out section).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ragkit.errors import ConfigError, RagkitError

try:
    import ray
except ImportError:  # the default local backend needs no Ray
    ray = None

TASK_RETRIES = 2
SHARD_ACTOR_CPUS = 0  # shard actors mostly wait: reserving no CPU, they never block build tasks or embedders


def connect(cluster: Any) -> None:
    """Join the cluster `cluster.address` names, once per process."""
    if ray is None:
        raise ConfigError("cluster.backend", '"ray" needs Ray: pip install -e ".[ray]"')
    if not ray.is_initialized():
        address = None if cluster.address == "auto" else cluster.address
        ray.init(address=address, log_to_driver=False, include_dashboard=False)


class RayRunner:
    def __init__(self, cluster: Any, progress: bool = False):
        connect(cluster)
        self.cluster, self.progress = cluster, progress

    def share(self, value: Any) -> Any:
        return ray.put(value)

    def map(self, fn: Callable, items: Sequence, *shared: Any, desc: str = "", rows: Sequence[int] = ()) -> list:
        from tqdm.auto import tqdm

        task = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False)(fn)
        refs = [task.remote(item, *shared) for item in items]
        size_of = dict(zip(refs, list(rows) or [1] * len(refs)))
        with tqdm(total=sum(size_of.values()), desc=desc, unit="doc", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            pending = list(refs)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)
                    bar.update(size_of[done[0]])
            except ray.exceptions.RayError as exc:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise RagkitError(f"building {desc or 'shards'} on Ray failed after {TASK_RETRIES} retries: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        return ray.get(refs)

    def embed(self, store: Any, texts: Sequence[str], spec: dict[str, Any], position: int, part_rows: int) -> None:
        from tqdm.auto import tqdm

        first = store.count
        if first >= len(texts):
            return
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ray.data.DataContext.get_current().enable_progress_bars = False
        batch_size = int(spec.get("batch_size", 64))
        dataset = ray.data.from_items(list(texts[first:])).map_batches(
            _Embedder, fn_constructor_kwargs={"spec": spec, "position": position}, batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.cluster.embed_actors),
            num_gpus=self.cluster.gpus_per_actor or None)
        with tqdm(total=len(texts), initial=first, desc="embedding (ray)", unit="doc", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            for batch in dataset.iter_batches(batch_size=part_rows, batch_format="numpy"):
                store.append(batch["vector"])
                bar.update(len(batch["vector"]))


class _Embedder:
    """A Ray Data actor: loads the encoder once, then embeds batches of documents."""

    def __init__(self, spec: dict[str, Any], position: int):
        import retrievers

        self.encoder = retrievers.build(spec, position).encoder

    def __call__(self, batch: dict) -> dict:
        return {"vector": self.encoder.encode([str(t) for t in batch["item"]], "document")}


class _ShardHolder:
    """The body of a shard actor: one loaded shard, searched on request."""

    def __init__(self, spec: dict[str, Any], position: int, folder: str):
        from retrievers.shards import open_shard

        self.shard = open_shard(spec, position, folder)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.shard, method)(*args)


class ActorShards:
    """One actor per shard; `call` runs a method on every shard at once and returns their answers in order."""

    def __init__(self, cluster: Any, spec: dict[str, Any], position: int, folders: list[Path]):
        connect(cluster)
        actor = ray.remote(num_cpus=SHARD_ACTOR_CPUS, max_restarts=1, max_task_retries=1)(_ShardHolder)
        self.actors = [actor.options(scheduling_strategy="SPREAD").remote(spec, position, str(f)) for f in folders]

    def call(self, method: str, *args: Any) -> list:
        shared = [ray.put(a) if hasattr(a, "nbytes") else a for a in args]  # query vectors: sent once
        return ray.get([a.call.remote(method, *shared) for a in self.actors])


def actor_pool(cluster: Any) -> Callable[[dict[str, Any], int, list[Path]], ActorShards]:
    """The pool factory `ShardedRetriever` takes: shards of this retriever held by Ray actors."""
    connect(cluster)
    return lambda spec, position, folders: ActorShards(cluster, spec, position, folders)
