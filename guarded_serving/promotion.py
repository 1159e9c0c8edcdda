"""Promotion and rollback: which primary serves, recorded in the store, followed by every worker.

A switch is an event of kind ``model_switch`` in the store's events table, chained to the one
before it (``Store.add_event_after``: of two switches recorded at once, one wins and the other is
refused, so a history never forks, across processes and replicas). Its body names the new
primary (model spec, profile, version) and the stack of primaries promoted so far, so ``rollback``
goes back to the one before without reading the history. With no event, the config's primary
serves.

Each serving process polls the newest event (``ServingRuntime``, every ``POLL_S`` seconds, on
its own thread); on a change it loads and warms the new model set off the request path and then
swaps one reference (``ServingRuntime.guard``). Requests in flight finish on the set they started
with; a process that cannot load the new set keeps the old one and says so (log, metric).

>>> event = promote(store, config, actor="cli", reason="replay: better")  # doctest: +SKIP
>>> event.to_version, event.action  # doctest: +SKIP
('2', <Action.PROMOTE: 'promote'>)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .config import ModelSpec, ServingConfig
from .errors import ConflictError, GuardedServingError
from .guard import GuardedModel, load_model_spec
from .profile import Profile

log = logging.getLogger(__name__)

__all__ = [
    "Action",
    "ModelVersion",
    "SwitchEvent",
    "build_guard",
    "current_switch",
    "promote",
    "rollback",
    "switches",
]

#: The events-table kind of a switch.
SWITCH_EVENT = "model_switch"
#: How often each serving process looks for a new switch (s).
POLL_S = 1.0
_SPEC_KEYS = ("path", "bentoml_tag", "callable", "trusted", "name", "version")


class Action(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class ModelVersion:
    """A primary as a switch names it: its model spec (paths absolute), profile and version."""

    spec: dict[str, Any]
    profile: str
    version: str

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "profile": self.profile, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelVersion:
        return cls(dict(d["spec"]), str(d["profile"]), str(d["version"]))

    @classmethod
    def of(cls, spec: ModelSpec, profile: Path, version: str) -> ModelVersion:
        fields = {k: getattr(spec, k) for k in _SPEC_KEYS if getattr(spec, k) not in (None, False)}
        if "path" in fields:
            fields["path"] = str(Path(fields["path"]).resolve())
        return cls(fields, str(Path(profile).resolve()), version)


@dataclass(frozen=True)
class SwitchEvent:
    """One recorded switch: when, who, why, from which primary to which."""

    id: int
    ts: float
    action: Action
    actor: str
    reason: str
    from_version: str
    to: ModelVersion
    #: The primaries promoted so far, oldest first; the last is ``to``.
    stack: tuple[ModelVersion, ...]

    @property
    def to_version(self) -> str:
        return self.to.version

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "action": str(self.action),
            "actor": self.actor,
            "reason": self.reason,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "to": self.to.to_dict(),
        }

    @classmethod
    def from_event(cls, ev: dict[str, Any]) -> SwitchEvent:
        b = ev["body"]
        stack = tuple(ModelVersion.from_dict(d) for d in b["stack"])
        return cls(
            int(ev["id"]),
            float(ev["ts"]),
            Action(b["action"]),
            str(b["actor"]),
            str(b.get("reason") or ""),
            str(b["from_version"]),
            stack[-1],
            stack,
        )


def config_primary(config: ServingConfig, version: str | None = None) -> ModelVersion:
    """The config's primary (what serves when no switch is recorded)."""
    if version is None:
        version = str(
            config.primary.version
            or load_model_spec(config.primary, config.task, "primary").version
        )
    return ModelVersion.of(config.primary, config.profile, version)


def challenger_version(config: ServingConfig) -> ModelVersion:
    """The config's challenger as a primary-to-be (ConflictError when the config names none)."""
    spec = config.challenger
    if spec is None:
        raise ConflictError("the serving config names no challenger to promote (challenger:)")
    version = str(spec.version or load_model_spec(spec, config.task, "challenger").version)
    model = ModelSpec.model_validate(
        {k: getattr(spec, k) for k in _SPEC_KEYS}, context={"base": Path("/")}
    )
    return ModelVersion.of(model, spec.profile or config.profile, version)


def current_switch(store: Any) -> SwitchEvent | None:
    """The newest switch (by id, not by a host's clock), or None when none was recorded."""
    ev = store.last_event(SWITCH_EVENT)
    return None if ev is None else SwitchEvent.from_event(ev)


def switches(store: Any, limit: int = 100) -> list[SwitchEvent]:
    """The recorded switches, newest first."""
    return [SwitchEvent.from_event(e) for e in store.events(SWITCH_EVENT, limit=limit)]


def promote(store: Any, config: ServingConfig, actor: str, reason: str = "") -> SwitchEvent:
    """Make the config's challenger the primary. ConflictError when it already is, or when
    another switch was recorded at the same moment (nothing is recorded then)."""
    target = challenger_version(config)
    cur = current_switch(store)
    stack = cur.stack if cur is not None else (config_primary(config),)
    if stack[-1].version == target.version:
        raise ConflictError(f"version {target.version!r} is already the primary")
    return _record(store, cur, Action.PROMOTE, actor, reason, stack[-1], (*stack, target))


def rollback(store: Any, config: ServingConfig, actor: str, reason: str = "") -> SwitchEvent:
    """Go back to the primary before the current one. ConflictError when nothing was promoted."""
    cur = current_switch(store)
    if cur is None or len(cur.stack) < 2:
        raise ConflictError("nothing to roll back: the config's primary is serving")
    return _record(store, cur, Action.ROLLBACK, actor, reason, cur.stack[-1], cur.stack[:-1])


def _record(
    store: Any,
    cur: SwitchEvent | None,
    action: Action,
    actor: str,
    reason: str,
    before: ModelVersion,
    stack: tuple[ModelVersion, ...],
) -> SwitchEvent:
    body = {
        "action": str(action),
        "actor": actor,
        "reason": reason,
        "from_version": before.version,
        "to_version": stack[-1].version,
        "stack": [m.to_dict() for m in stack],
    }
    new_id = store.add_event_after(SWITCH_EVENT, cur.id if cur is not None else 0, body)
    if new_id is None:
        raise ConflictError("another switch was recorded at the same moment; look again and retry")
    ev = store.last_event(SWITCH_EVENT)
    return SwitchEvent.from_event(
        ev
        if ev is not None and int(ev["id"]) == new_id
        else {"id": new_id, "ts": 0.0, "body": body}
    )


def build_guard(
    config: ServingConfig, target: ModelVersion, fallback_from: GuardedModel
) -> GuardedModel:
    """The model set of ``target``: its primary and profile, the config's policy and budget, the
    running fallback; loaded and warmed (one prediction) before it is returned."""
    spec = ModelSpec.model_validate(target.spec, context={"base": Path("/")})
    primary = load_model_spec(spec, config.task, "primary")
    profile = Profile.load(target.profile)
    if profile.task != config.task:
        raise GuardedServingError(
            f"profile {target.profile}: its task is {profile.task!r}, not {config.task!r}"
        )
    guard = GuardedModel(
        primary,
        fallback_from.fallback,
        profile,
        config.policy,
        config.latency_budget_ms,
        config.name,
    )
    guard.version = target.version
    guard.predict([_typical_row(profile)], on_reject="mark")  # warm: the first call is slow
    return guard


def _typical_row(profile: Profile) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for f in profile.features:
        if f.kind in ("numeric", "integer") and f.mean is not None:
            row[f.name] = round(f.mean) if f.kind == "integer" else f.mean
        elif f.categories:
            row[f.name] = max(f.categories, key=lambda c: f.categories[c])
        else:
            row[f.name] = None
    return row
