"""Child names are valid DNS-1035 labels for every valid object name, deterministic and collision-free."""

from __future__ import annotations

import itertools
import random
import string

import pytest
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.k8s.naming import child_name, is_dns1035_label, is_label_value, label_safe

LONG = "a" * 253
CASES = [
    # (job name, stage, expected child name or None when only validity is checked)
    ("demo", Stage.TRAIN, "demo-train"),
    ("my-job", Stage.SERVE, "my-job-serve"),
    ("a" * 54, Stage.VALIDATE, "a" * 54 + "-validate"),  # exactly 63: kept readable
    ("a" * 55, Stage.VALIDATE, None),  # 64: hashed
    ("1st-run", Stage.TRAIN, None),  # Services need a leading letter
    ("team.v2.run", Stage.EVALUATE, None),  # dots are fine in names, not in labels
    (LONG, Stage.EXPORT, None),
    ("0", Stage.SERVE, None),
    ("a." * 126 + "a", Stage.SERVE, None),
]


@pytest.mark.parametrize(("name", "stage", "expected"), CASES)
def test_child_name_is_valid_label(name: str, stage: Stage, expected: str | None) -> None:
    child = child_name(name, stage)
    assert is_dns1035_label(child), child
    assert child.endswith(f"-{stage.value}")
    assert child == child_name(name, stage)  # deterministic
    if expected is not None:
        assert child == expected


def _random_subdomain(rng: random.Random) -> str:
    alphabet = string.ascii_lowercase + string.digits
    length = rng.randint(1, 253)
    chars = [rng.choice(alphabet + "-.") for _ in range(length)]
    chars[0] = rng.choice(alphabet)
    chars[-1] = rng.choice(alphabet)
    name = "".join(chars)
    while ".." in name or ".-" in name or "-." in name:
        name = name.replace("..", ".a").replace(".-", ".a").replace("-.", "a.")
    return name


def test_random_valid_names_never_collide() -> None:
    rng = random.Random(7)
    names = {_random_subdomain(rng) for _ in range(3000)}
    # Names that differ only where sanitising or truncating would erase the difference.
    names |= {"run.1", "run-1", "run1", "a" * 200 + "x", "a" * 200 + "y"}
    children: dict[str, tuple[str, Stage]] = {}
    for name, stage in itertools.product(sorted(names), Stage):
        child = child_name(name, stage)
        assert is_dns1035_label(child), (name, child)
        assert child not in children, (name, stage, children.get(child))
        children[child] = (name, stage)


@pytest.mark.parametrize("value", ["demo", "a" * 63, "a" * 64, LONG, "x.y-z", "-bad-", "a" * 62 + ".b"])
def test_label_safe(value: str) -> None:
    safe = label_safe(value)
    assert is_label_value(safe)
    if is_label_value(value):
        assert safe == value
    else:
        assert safe != label_safe(value + "x")


def _is_object_name(value: str) -> bool:
    """A valid metadata.name (DNS-1123 subdomain), what a FineTuneJob may be called."""
    import re

    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    return len(value) <= 253 and re.fullmatch(rf"{label}(\.{label})*", value) is not None


@pytest.mark.parametrize("stage", list(Stage))
def test_a_plain_name_never_equals_a_hashed_one_at_any_length(stage: Stage) -> None:
    """Issue 9, item 5: the plain 63-character name of a job once equalled the hashed name of a 64-character
    one. For every length, name the job after another job's hashed child: the children must differ."""
    for length in range(1, 254):
        for filler in ("a", "ab-", "x.y"):
            victim = (filler * length)[:length].strip(".-") or "a"
            if not _is_object_name(victim):
                continue
            hashed = child_name(victim, stage)
            attacker = hashed[: -len(stage.value) - 1]  # so that `<attacker>-<stage>` spells `hashed`
            assert f"{attacker}-{stage.value}" == hashed
            if attacker != victim and _is_object_name(attacker):
                assert child_name(attacker, stage) != hashed, (victim, attacker)


def test_the_two_forms_are_told_apart_by_the_marker() -> None:
    for length in range(1, 254):
        name = "a" * length
        for stage in Stage:
            child = child_name(name, stage)
            plain = f"{name}-{stage.value}"
            if child == plain:
                assert "--" not in child
            else:
                assert child.count("--") == 1 and len(child) <= 63, child
    assert child_name("a--b", Stage.TRAIN) != "a--b-train"  # a plain name with the marker is hashed


def test_names_around_the_limit_never_collide() -> None:
    """Property-style: every length from 40 to 80 characters, several shapes (including names made to look
    like hashed children and ones with `--`), every stage: valid, deterministic, all distinct."""
    rng = random.Random(9)
    names: set[str] = set()
    for length in range(40, 81):
        names.add("a" * length)
        names.add(("ab-" * length)[:length].rstrip("-"))
        names.add("b" * (length - 3) + "--c")
        names.add(
            "".join(rng.choice(string.ascii_lowercase + "-") for _ in range(length - 2)).strip("-") + "z9"
        )
        for stage in Stage:  # names spelling another name's hashed child, minus the stage
            names.add(child_name("a" * length, stage)[: -len(stage.value) - 1])
    names = {n for n in names if _is_object_name(n)}
    children: dict[str, tuple[str, Stage]] = {}
    for name, stage in itertools.product(sorted(names), Stage):
        child = child_name(name, stage)
        assert is_dns1035_label(child) and child == child_name(name, stage), (name, child)
        assert child not in children, (name, stage, children.get(child))
        children[child] = (name, stage)


@pytest.mark.parametrize("value", ["demo\n", "demo\r\n", "\n"])
def test_a_final_newline_is_neither_a_label_nor_a_label_value(value: str) -> None:
    assert not is_dns1035_label(value) and not is_label_value(value)
    assert is_label_value(label_safe(value))


def test_one_scheme_names_every_kinds_children_within_any_limit() -> None:
    """Issue 21: FineTuneJob stages, a ModelServer's `pool` and the Indexed training Job (whose pods append
    `-<index>`, so its name must leave room) share one scheme. Within each limit the children are valid
    labels no longer than the limit, deterministic, and distinct for every (name, component); a name that
    does not start with a letter gets its kind's lead letter."""
    rng = random.Random(21)
    names = {_random_subdomain(rng) for _ in range(600)} | {"1st-run", "9.pools", "9-pools", "a" * 61}
    names |= {"a" * length for length in range(50, 66)}
    components = [*(stage.value for stage in Stage), "pool"]
    for max_len, lead in ((63, "j"), (61, "j"), (63, "m")):
        children: dict[str, tuple[str, str]] = {}
        for name, component in itertools.product(sorted(names), components):
            child = child_name(name, component, lead=lead, max_len=max_len)
            assert is_dns1035_label(child) and len(child) <= max_len, (name, child)
            if max_len < 63:  # room for `-<index>`
                assert is_dns1035_label(f"{child}-{'9' * (63 - max_len - 1)}"), child
            assert child == child_name(name, component, lead=lead, max_len=max_len)
            assert child.endswith(f"-{component}")
            assert child not in children, (name, component, children.get(child))
            children[child] = (name, component)
    assert child_name("1st", "pool", lead="m").startswith("m-1st--")
    assert child_name("1st", Stage.TRAIN).startswith("j-1st--")


def test_a_limit_too_short_for_the_hashed_form_is_refused() -> None:
    assert child_name("a" * 40, Stage.TRAIN, max_len=25).startswith("a--")  # the prefix shrinks to one letter
    with pytest.raises(ValueError, match="no room"):
        child_name("a" * 40, Stage.TRAIN, max_len=24)
