"""ragkit component: generators (decoder with an explicit KV cache)."""
