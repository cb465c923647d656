"""ragkit component: chunk_cache."""
