"""Why a stage's pod does not start, as the job's condition says it: kubelet's waiting reason with its
message (ErrImagePull, CreateContainerError, RunContainerError, …), and for a crash loop how the last run
ended; pod text masked and capped before it reaches the status."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.finetunejob_status import Stage

from .ftj_factory import job, pending_pod
from .test_state import EVAL_GOOD, World, _to_evaluated, _to_training

VENV_MESSAGE = (
    'image "vllm/vllm-openai:v0.11.0" is not present on this machine: the local kubelet runs it in '
    "/srv/.venv-vllm, which does not exist (run `make vllm-venv`)"
)


def _pod(
    container: str,
    reason: str,
    message: str = "",
    last: dict[str, Any] | None = None,
    init: bool = False,
) -> dict[str, Any]:
    pod = pending_pod()
    status: dict[str, Any] = {"name": container, "state": {"waiting": {"reason": reason}}, "restartCount": 0}
    if message:
        status["state"]["waiting"]["message"] = message
    if last is not None:
        status["lastState"] = {"terminated": last}
        status["restartCount"] = 3
        pod["status"]["phase"] = "Running"
    pod["status"]["initContainerStatuses" if init else "containerStatuses"] = [status]
    return pod


def _serving(world: World, pod: dict[str, Any]) -> None:
    """A replica of the job's ModelServer that does not start, as the pool controller sees it."""
    world.pool_pass(ready_replicas=0, starting=[pod])
    world.step()


def test_a_serving_pod_whose_image_cannot_be_pulled_names_the_cause() -> None:
    """The job's ModelServer reports why its replica does not start; the job's condition says it."""
    world = World(job(deployment={"servedModelName": "toy-bot"}))
    _to_evaluated(world, EVAL_GOOD)
    world.step()
    _serving(world, _pod("vllm", "ErrImagePull", VENV_MESSAGE))
    deployed = world.condition["Deployed"]
    assert (world.status["phase"], deployed["status"]) == ("Deploying", "Unknown")
    assert deployed["message"].endswith(f"container vllm: ErrImagePull: {VENV_MESSAGE}")
    assert world.status["message"] == deployed["message"]
    assert world.last is not None

    backoff = f'Back-off pulling image "vllm/vllm-openai:v0.11.0": ErrImagePull: {VENV_MESSAGE}'
    _serving(world, _pod("vllm", "ImagePullBackOff", backoff))
    assert world.condition["Deployed"]["message"].endswith(f"container vllm: ImagePullBackOff: {backoff}")


def test_create_and_run_container_errors_wait_with_kubelets_message() -> None:
    world = World(job())
    _to_training(world)
    for reason, message in (
        ("CreateContainerError", "failed to generate container spec: no command specified"),
        ("RunContainerError", 'exec: "trainer": executable file not found in $PATH'),
    ):
        world.pods[Stage.TRAIN] = [_pod("trainer", reason, message)]
        world.step()
        trained = world.condition["Trained"]
        assert (world.status["phase"], trained["reason"]) == ("Training", "ContainerConfigError")
        assert trained["message"] == f"container trainer: {reason}: {message}"


def test_a_crash_loop_says_how_the_last_run_ended_not_the_back_off_delay() -> None:
    world = World(job(deployment={"servedModelName": "toy-bot"}))
    _to_evaluated(world, EVAL_GOOD)
    log_tail = "INFO starting\n" * 300 + "ValueError: Available memory on node 0 (21.58/23.54 GiB) is too low"
    last = {"exitCode": 1, "reason": "Error", "message": log_tail}
    world.step()
    _serving(world, _pod("vllm", "CrashLoopBackOff", "back-off 5m0s restarting failed container=vllm", last))
    deployed = world.condition["Deployed"]
    assert deployed["reason"] == "LoadingAdapter"
    assert "container vllm: CrashLoopBackOff; last terminated: Error (exit code 1)" in deployed["message"]
    assert deployed["message"].endswith("ValueError: Available memory on node 0 (21.58/23.54 GiB) is too low")
    assert "back-off" not in deployed["message"]
    assert len(deployed["message"]) < 600  # the log tail's end, capped (after the pool's replica count)
    # Without a previous run kubelet's own message is all there is.
    _serving(world, _pod("vllm", "CrashLoopBackOff", "back-off 10s restarting failed container=vllm"))
    assert world.condition["Deployed"]["message"].endswith(
        "container vllm: CrashLoopBackOff: back-off 10s restarting failed container=vllm"
    )


def test_secret_shaped_text_from_a_pod_never_reaches_the_status() -> None:
    world = World(job())
    _to_training(world)
    leaked = (
        "Traceback: connect https://admin:hunter2secret@mlflow.internal:5000 failed; "
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY "
        "token hf_abcdefghijklmnopqrstuvwxyz01 "
        "Authorization: Bearer sk-live-0123456789abcdef"
    )
    last = {"exitCode": 2, "reason": "Error", "message": leaked}
    world.pods[Stage.TRAIN] = [_pod("fetch", "CrashLoopBackOff", "back-off 20s", last, init=True)]
    world.step()
    message = world.condition["Trained"]["message"]
    assert message.startswith("container fetch: CrashLoopBackOff; last terminated: Error (exit code 2)")
    for secret in ("hunter2secret", "wJalrXUtnFEMI", "hf_abcdefghij", "sk-live-0123456789abcdef"):
        assert secret not in message and secret not in world.status["message"]
    assert "https://admin:***@mlflow.internal:5000" in message


def test_a_long_kubelet_message_and_log_tail_fit_in_one_condition_keeping_the_tails_end() -> None:
    world = World(job())
    _to_training(world)
    pulled = "rpc error: " + "failed to resolve reference; " * 200
    last = {"exitCode": 137, "reason": "Error", "message": "x" * 5000 + " the reason at the end"}
    world.pods[Stage.TRAIN] = [_pod("trainer", "RunContainerError", pulled, last)]
    world.step()
    message = world.condition["Trained"]["message"]
    assert message.startswith("container trainer: RunContainerError: rpc error: failed to resolve reference;")
    assert (
        message.endswith("the reason at the end") and "; last terminated: Error (exit code 137): …" in message
    )
    assert len(message) <= 1024
