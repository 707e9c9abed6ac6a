"""Embedded local Kubernetes cluster: API emulator, local kubelet and S3 on loopback."""
