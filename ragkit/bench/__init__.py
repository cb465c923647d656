"""`ragkit bench ...`: measurements that call the public API and print ratios measured side by side."""
