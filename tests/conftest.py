"""Test tiers: unit/ (the product, pure and fast), trainer/, chart/, e2e/ (the whole loop on the embedded
cluster); the embedded cluster's own tiers: emulator/ (its units) and conformance/ (through kubectl and the
Python client, against it or any KUBECONFIG). Only the tiers that need a cluster import its fixtures
(localcluster.pytest_plugin) in their own conftest."""
