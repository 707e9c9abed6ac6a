"""A real MLflow tracking server in the embedded cluster (dev tooling): a Deployment and a Service `mlflow` in
namespace `default`, so pods reach it at http://mlflow.default.svc:5000 and the host through services.json
(key `mlflow`).

The pod runs PyPI `mlflow` (requirements/mlflow.txt, in .venv-mlflow: its pins clash with the trainer's)
with a SQLite backend store on a host directory and artifacts proxied to the cluster's S3 (bucket `mlflow`).
It is started on demand (`LocalCluster(mlflow=True)`, `cluster.start_mlflow()`): `make local-cluster` and
`make demo` start it, test sessions only when a fixture asks, so other tests do not wait for it.
"""

from __future__ import annotations

from typing import Any

from .runtime import MLFLOW_IMAGE  # the local kubelet runs it from .venv-mlflow

MLFLOW_VERSION = "v3.17.2"
NAMESPACE = "default"
NAME = "mlflow"
PORT = 5000
BUCKET = "mlflow"
SERVICES_KEY = "mlflow"  # services.json alias of default/mlflow
IN_CLUSTER_URL = f"http://{NAME}.{NAMESPACE}.svc:{PORT}"
LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/managed-by": "localcluster"}
# MLflow refuses unknown Host headers (DNS rebinding); these are the names pods and the host use.
ALLOWED_HOSTS = f"{NAME}.{NAMESPACE}.svc:*,{NAME}.{NAMESPACE}.svc.cluster.local:*,127.*,localhost:*"


def manifests(s3_secret: str, s3_endpoint: str, data_dir: str) -> list[dict[str, Any]]:
    """The Deployment and the Service. The SQLite store is on a hostPath (`<workdir>/mlflow`), so a test that
    scales the server to 0 and back finds its runs again."""
    container = {
        "name": "mlflow",
        "image": f"{MLFLOW_IMAGE}:{MLFLOW_VERSION}",
        "args": [
            "--backend-store-uri",
            "sqlite:///mlflow.db",  # relative to workingDir: the data volume
            "--artifacts-destination",
            f"s3://{BUCKET}/artifacts",
            "--port",
            str(PORT),
            "--workers",
            "1",
            "--allowed-hosts",
            ALLOWED_HOSTS,
        ],
        "workingDir": "/data",
        "envFrom": [{"secretRef": {"name": s3_secret}}],
        "env": [
            {"name": "MLFLOW_S3_ENDPOINT_URL", "value": s3_endpoint},
            # No job runner (huey workers for GenAI jobs): tracking and the registry need none of them.
            {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"},
        ],
        "ports": [{"name": "http", "containerPort": PORT}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": PORT},
            "periodSeconds": 1,
            "failureThreshold": 600,
        },
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": LABELS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "data", "hostPath": {"path": data_dir, "type": "DirectoryOrCreate"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "labels": LABELS,
            "annotations": {"localcluster.dev/services-key": SERVICES_KEY},
        },
        "spec": {
            "selector": {"app.kubernetes.io/name": NAME},
            "ports": [{"name": "http", "port": PORT, "targetPort": PORT}],
        },
    }
    return [deployment, service]
