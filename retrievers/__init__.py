"""ragkit component: retrievers."""
