"""Where a pipeline's retrievers are built and opened: in this process, in shards, or on Ray.

The pipeline names the layout (`sharded`, from its config) and the cluster settings; this module picks
the implementation, so the pipeline never branches on local vs sharded vs Ray:

    in memory   retrievers.build(spec).index(chunks), saved into its folder, opened with load()
    sharded     retrievers.shards: streamed into shards within `memory_budget` bytes (embeddings first,
                resumable, for the dense kinds), opened as a ShardedRetriever
    Ray         the same shards, built by a RayRunner and searched through an actor pool
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ragkit.errors import IndexMismatchError
from ragkit.types import Chunk


class RetrieverFactory:
    def __init__(self, cluster: Any, sharded: bool, memory_budget: int, progress: bool = True):
        """cluster: the [cluster] settings (backend, shards, address, ...), read by the Ray backend."""
        self.cluster, self.sharded, self.memory_budget, self.progress = cluster, sharded, memory_budget, progress
        self._plan = None

    @property
    def ray(self) -> bool:
        return self.cluster.backend == "ray"

    def build(self, spec: dict[str, Any], position: int, chunks: Sequence[Chunk], folder: Path,
              bar: Callable[[Iterable, str], Iterable] = lambda items, _desc: items):
        """Index `chunks` into `folder`; returns the retriever in memory, or None when it is sharded (open
        it where it is published)."""
        if self.sharded:
            from retrievers import shards

            plan = self._build_plan()
            embeddings = shards.embed(spec, position, chunks, plan) if spec["type"] in shards.DENSE_KINDS else None
            shards.build(spec, position, chunks, folder, plan, embeddings)
            return None
        import retrievers

        retriever = retrievers.build(spec, position)
        retriever.index(bar(chunks, f"indexing {spec['type']}"))
        retriever.save(folder)
        return retriever

    def open(self, folder: Path, position: int, spec: dict[str, Any]):
        """The retriever saved in `folder`; files that pass their checksums yet do not parse are an
        IndexMismatchError naming the folder."""
        import retrievers

        pool = None
        if self.ray:
            from retrievers import ray_backend

            pool = ray_backend.actor_pool(self.cluster)
        try:
            if self.sharded:
                from retrievers.shards import ShardedRetriever

                return ShardedRetriever(spec, position, folder, pool)
            retriever = retrievers.build(spec, position)
            retriever.load(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexMismatchError(f"{folder}: unreadable index ({type(exc).__name__}: {exc}); "
                                     "rebuild it with `ragkit index`") from None
        return retriever

    def _build_plan(self):
        if self._plan is None:
            from retrievers.shards import BuildPlan, LocalRunner

            if self.ray:
                from retrievers import ray_backend

                runner = ray_backend.RayRunner(self.cluster, progress=self.progress)
            else:
                runner = LocalRunner(progress=self.progress)
            self._plan = BuildPlan(shards=self.cluster.shards, memory_budget=self.memory_budget, runner=runner)
        return self._plan
