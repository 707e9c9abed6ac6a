"""Where a run's outputs live: everything under `<storage.output>/<namespace>/<name>/<uid>`."""

from __future__ import annotations

from dataclasses import dataclass


def run_prefix(output: str, namespace: str, name: str, uid: str) -> str:
    """The run prefix of one FineTuneJob (the uid keeps a re-created job from reading an older run)."""
    return f"{output.rstrip('/')}/{namespace}/{name}/{uid}"


@dataclass(frozen=True)
class RunLayout:
    """The storage table of CONTRACT.md: which stage writes what, under the run prefix."""

    prefix: str

    def join(self, *parts: str) -> str:
        return "/".join([self.prefix.rstrip("/"), *(p.strip("/") for p in parts)])

    @property
    def data(self) -> str:
        """validate: the cleaned train/validation/test JSONL and its report."""
        return self.join("data")

    @property
    def checkpoints(self) -> str:
        return self.join("checkpoints")

    def checkpoint(self, step: int) -> str:
        return self.join("checkpoints", f"step-{step:08d}")

    @property
    def adapter(self) -> str:
        return self.join("model", "adapter")

    @property
    def merged(self) -> str:
        return self.join("model", "merged")

    @property
    def train(self) -> str:
        """train: logs, loss curve and the final training report."""
        return self.join("train")

    @property
    def evaluation(self) -> str:
        return self.join("evaluation")

    @property
    def evaluation_report(self) -> str:
        return self.join("evaluation", "report.json")

    @property
    def tracking_run(self) -> str:
        """The job's MLflow run id, so a resumed or later stage logs to the same run."""
        return self.join("tracking", "run.json")
