"""The operator config: built-in GPU table, YAML file merged over it, env overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_operator.config import ConfigError, load_config


def test_builtin_table_has_the_required_gpu_types() -> None:
    config = load_config(env={})
    for name in ("a100-40gb", "a100-80gb", "h100-80gb", "cpu"):
        assert config.gpu_type(name).tokens_per_second > 0
    assert config.gpu_type("a100-80gb").resource_name == "nvidia.com/gpu"
    assert config.gpu_type("a100-80gb").node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert config.gpu_type("cpu").resource_name == ""
    assert config.images.trainer.startswith("ghcr.io/finetune-operator/trainer")


def test_file_merges_over_builtins_and_env_wins(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        """
images:
  trainer: registry.local/trainer:9
  pullPolicy: Always
gpuTypes:
  l4:
    resourceName: nvidia.com/gpu
    nodeSelector: {gpu: l4}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    memoryGiB: 24
    tokensPerSecond: 900
  a100-80gb:
    resourceName: nvidia.com/gpu
    nodeSelector: {pool: a100}
    tokensPerSecond: 3500
defaults:
  shmSize: 32Gi
"""
    )
    config = load_config(path, env={"FTO_VLLM_IMAGE": "vllm/vllm-openai:test", "FTO_TRAINER_IMAGE": "t:1"})
    assert config.images.trainer == "t:1"  # env beats file
    assert config.images.vllm == "vllm/vllm-openai:test"
    assert config.images.pull_policy == "Always"
    assert config.gpu_type("l4").tokens_per_second == 900
    assert config.gpu_type("a100-80gb").node_selector == {"pool": "a100"}  # an entry replaces the built-in
    assert config.gpu_type("h100-80gb").memory_gib == 80  # untouched built-ins stay
    assert config.defaults.shm_size == "32Gi"
    assert config.defaults.resync_seconds == 60


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("gpuTypes: {x: {resourceName: a}}", "gpuTypes.x.tokensPerSecond"),
        ("gpuTypes: {x: {tokensPerSecond: -1}}", "gpuTypes.x.tokensPerSecond"),
        ("images: {pullPolicy: Sometimes}", "images.pullPolicy"),
        ("defaults: {shmSzie: 1Gi}", "defaults.shmSzie"),
        ("- a list", "must be a mapping"),
        ("images: {trainer: [unclosed", "cannot read"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    assert field in str(error.value)
    assert str(path) in str(error.value)


def test_unknown_gpu_type_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown gpuType 'tpu'.*a100-40gb"):
        load_config(env={}).gpu_type("tpu")


def test_env_config_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("images: {vllm: 'v:2'}")
    assert load_config(env={"FTO_CONFIG": str(path)}).images.vllm == "v:2"


def test_the_helm_charts_config_map_loads(tmp_path: Path) -> None:
    import subprocess

    import yaml

    repo = Path(__file__).resolve().parents[2]
    helm = repo / ".tools" / "bin" / "helm"
    if not helm.exists():
        pytest.skip("helm not installed (make tools)")
    rendered = subprocess.run(
        [str(helm), "template", "t", str(repo / "charts" / "finetune-operator")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    config_map = next(d for d in yaml.safe_load_all(rendered) if d and d.get("kind") == "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    config = load_config(path, env={})
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "cpu"} <= set(config.gpu_types)
    assert config.images.trainer.startswith("ghcr.io/finetune-operator/trainer:")
