"""Role profiles and workflows from the reference study, and how a host profile scales them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from ..load_keys import BUILTIN_WORKFLOWS, DEFAULT_IMAGE_SIZE
from ..matrix import Workload


@dataclass(frozen=True)
class Role:
    """One kind of agent: how often it calls, how long it answers, how much tool output it reads."""

    name: str
    cadence_s: float | None  # None: continuous (next turn as soon as the last one ends)
    max_tokens: int
    tool_tokens: int
    thinking: bool = True
    images_per_turn: int = 0  # images sent with the tool result on an image turn (mmproj configs only)
    image_every: int = 1  # every k-th turn (turn 0, k, 2k, ...) carries the images
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE

    def images_on(self, turn: int) -> int:
        """How many images turn ``turn`` carries."""
        return self.images_per_turn if self.images_per_turn and turn % self.image_every == 0 else 0


BUILTIN_ROLES: dict[str, Role] = {
    "TL": Role("TL", 120.0, 1500, 400),
    "Dev": Role("Dev", None, 8000, 15000),
    "QA": Role("QA", 60.0, 2500, 5000),
    "Research": Role("Research", None, 5000, 8000),
    "ToolStorm": Role("ToolStorm", None, 500, 800, thinking=False),
}



def scale(role: Role, workload: Workload) -> Role:
    """A role shrunk to a profile: the study's 8,000-token Dev turns take hours on a CPU, so a
    profile scales tokens and cadences with ``token_scale`` / ``cadence_scale`` and keeps the shape."""
    return replace(
        role,
        max_tokens=max(1, round(role.max_tokens * workload.token_scale)),
        tool_tokens=max(1, round(role.tool_tokens * workload.token_scale)),
        cadence_s=None if role.cadence_s is None else role.cadence_s * workload.cadence_scale,
    )


def roles_from_matrix(user: Mapping[str, Mapping[str, Any]]) -> dict[str, Role]:
    """Built-in roles plus (or overridden by) the matrix file's ``[roles.NAME]`` tables."""
    roles = dict(BUILTIN_ROLES)
    for name, data in user.items():
        roles[name] = Role(name, data.get("cadence_s"), int(data["max_tokens"]), int(data["tool_tokens"]),
                           bool(data.get("thinking", True)), int(data.get("images_per_turn", 0)),
                           int(data.get("image_every", 1)), tuple(data.get("image_size", DEFAULT_IMAGE_SIZE)))
    return roles


def resolve_workflow(name: str, roles: dict[str, Role], workflows: dict[str, tuple[str, ...]]) -> list[Role]:
    """The agents of a workflow, one Role each; KeyError names what is missing."""
    try:
        names = workflows[name]
    except KeyError:
        raise KeyError(f"unknown workflow {name!r} (known: {', '.join(sorted(workflows))})") from None
    missing = [n for n in names if n not in roles]
    if missing:
        raise KeyError(f"workflow {name!r} names unknown roles {missing} (known: {', '.join(sorted(roles))})")
    return [roles[n] for n in names]


def scaled_names(name: str, n: int) -> tuple[str, ...]:
    """A built-in workflow filled to ``n`` agents (one per slot): A is TL then Dev and QA alternating
    (N=3 is the study's TL, Dev, QA; N=5 its TL + 2 Dev + 2 QA); B is N x Research; ToolStorm N x
    ToolStorm. KeyError for a name that is not built in."""
    if name not in BUILTIN_WORKFLOWS:
        raise KeyError(f"{name!r} is not a built-in workflow")
    n = max(1, n)
    if name == "A":
        return ("TL", *(("Dev", "QA")[i % 2] for i in range(n - 1)))
    return (BUILTIN_WORKFLOWS[name][0],) * n


def workflow_roles(name: str, n: int, roles: dict[str, Role], user: Mapping[str, tuple[str, ...]]) -> list[Role]:
    """The agents of workflow ``name`` on a config of ``n`` slots: a workflow the matrix lists in
    ``[workflows]`` keeps its list as written (even under a built-in name); a built-in one scales to
    N (``scaled_names``)."""
    if name in user:
        return resolve_workflow(name, roles, dict(user))
    if name in BUILTIN_WORKFLOWS:
        return resolve_workflow(name, roles, {name: scaled_names(name, n)})
    return resolve_workflow(name, roles, {**BUILTIN_WORKFLOWS, **user})
