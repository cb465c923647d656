"""ragkit component: eval."""
