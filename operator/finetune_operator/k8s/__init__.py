"""Kubernetes mechanics every kind shares (client, ownership, Events, naming, typed manifests)."""
