"""Test tiers: unit/ (pure, fast), trainer/, chart/, conformance/ (the embedded cluster, or any KUBECONFIG),
e2e/ (the whole loop on the embedded cluster). Only the tiers that need a cluster import its fixtures
(localcluster.pytest_plugin) in their own conftest."""
