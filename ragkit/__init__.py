"""ragkit: index, retrieve, answer with reused chunk KV caches, and evaluate."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Pipeline pulls in torch and friends; import it only when asked for.
    if name == "Pipeline":
        from ragkit.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)


__all__ = ["Pipeline", "__version__"]
