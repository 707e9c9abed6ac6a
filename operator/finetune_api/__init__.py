"""The OpenAI-compatible fine-tuning API (docs/openai-api.md): `/v1/files`, `/v1/fine_tuning/jobs`,
`/v1/models` and `/v1/chat/completions` over FineTuneJobs in the caller's namespace.

A service of its own beside the operator (same image, `python -m finetune_api`; the chart's `api.enabled`). It
calls the Kubernetes API with the caller's bearer token for everything about jobs, so RBAC, admission policies
and budgets apply as for kubectl; its own identity may only create TokenReviews and SubjectAccessReviews and
read the model mapping ConfigMap. It never imports the operator's controllers nor Kopf (.importlinter).
"""
