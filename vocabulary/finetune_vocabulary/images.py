"""The product's images and the entrypoint each runs when a container sets only args (their ENTRYPOINTs)."""

from __future__ import annotations

from types import MappingProxyType

TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer"
OPERATOR_IMAGE = "ghcr.io/finetune-operator/operator"
VLLM_IMAGE = "vllm/vllm-openai"

TRAINER_ENTRYPOINT: tuple[str, ...] = ("python", "-m", "finetune_trainer")
OPERATOR_ENTRYPOINT: tuple[str, ...] = ("python", "-m", "finetune_operator")
VLLM_ENTRYPOINT: tuple[str, ...] = ("python3", "-m", "vllm.entrypoints.openai.api_server")

# image repository (no registry default, no tag) → entrypoint
ENTRYPOINTS = MappingProxyType(
    {
        TRAINER_IMAGE: TRAINER_ENTRYPOINT,
        OPERATOR_IMAGE: OPERATOR_ENTRYPOINT,
        VLLM_IMAGE: VLLM_ENTRYPOINT,
    }
)
