"""Child names are valid DNS-1035 labels for every valid object name, deterministic and collision-free."""

from __future__ import annotations

import itertools
import random
import string

import pytest
from finetune_operator.naming import Stage, child_name, is_dns1035_label, is_label_value, label_safe

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
