"""Kubernetes operator for self-service LLM fine-tuning (FineTuneJob, finetune.dev/v1alpha1)."""

__version__ = "0.1.0"
