"""Shared pytest setup: the embedded cluster's fixtures (local_cluster, lc_kubectl, lc_namespace, …)."""

pytest_plugins = ["localcluster.pytest_plugin"]
