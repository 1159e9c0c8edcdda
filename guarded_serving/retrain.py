"""Retraining: run the user's own training script on a fresh export of the prediction log and take
its output as the candidate model (which ``replay`` then judges).

The serving config's ``retrain:`` section describes the run; guarded-serving never trains a model
itself:

```yaml
retrain:
  # argv (a list, or a string split like a shell would, but never run through a shell);
  # placeholders below; relative paths resolve in the config's directory, the working directory
  command: "{python} retrain.py --export {export} --out {candidate}"
  candidate: candidate.onnx   # the file the script must write, in the run directory
  workdir: runs               # each run gets workdir/<UTC time>/ (export, candidate, log);
                              # default: <data dir>/<name>/retrain (see config.data_dir)
  since: 30d                  # export only rows logged since then (an ISO time or 24h, 7d ...)
  holdout: 0.2                # newest fraction of rows with outcomes kept out of the export, for replay
  timeout_seconds: 3600
  env: {MY_SETTING: "1"}      # added to the script's environment
  trusted: false
  on_recommendation: true     # also run when the drift monitor first recommends retraining              # the candidate is a pickle/joblib file you trust
```

Placeholders (also passed as environment variables ``GUARDED_SERVING_<NAME>``): ``{export}`` the
Parquet export, ``{candidate}`` where to write the model, ``{run_dir}``, ``{config}`` the serving
config, ``{profile}`` its profile, ``{target}`` the outcome column, ``{task}``, ``{python}`` the
interpreter running guarded-serving.

The holdout is split by time: the newest ``holdout`` fraction of the rows with outcomes is left out
of the export the script sees, and the candidate is replayed on it. Replaying a candidate on rows
it was trained on would flatter it.

>>> spec = RetrainSpec.from_dict({"command": "{python} train.py {export} {candidate}"}, base=Path("/srv"))
>>> plan = spec.plan(run_dir=Path("/srv/retrain/run1"), config=Path("/srv/serving.yaml"),
...                  profile=Path("/srv/profile.json"), target="price", task="regression")
>>> plan.argv[1:], plan.env["GUARDED_SERVING_TARGET"]
(('train.py', '/srv/retrain/run1/export.parquet', '/srv/retrain/run1/candidate.onnx'), 'price')
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ConfigError, RetrainError

__all__ = [
    "PLACEHOLDERS",
    "RetrainError",
    "RetrainPlan",
    "RetrainResult",
    "RetrainSpec",
    "load_candidate",
    "run",
    "split_holdout",
]

log = logging.getLogger(__name__)

#: What ``{name}`` in ``retrain.command`` stands for.
PLACEHOLDERS = ("export", "candidate", "run_dir", "config", "profile", "target", "task", "python")
EXPORT_FILE = "export.parquet"
LOG_FILE = "retrain.log"
_KEYS = ("command", "candidate", "workdir", "since", "holdout", "timeout_seconds", "env", "trusted",
         "on_recommendation")


@dataclass(frozen=True)
class RetrainPlan:
    """One run, fully resolved: what to execute, where, and where its output goes."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: Path
    run_dir: Path
    export: Path
    candidate: Path
    log: Path
    timeout_seconds: float


@dataclass(frozen=True)
class RetrainSpec:
    """The ``retrain:`` section of a serving config (see the module docstring)."""

    command: tuple[str, ...]
    base: Path
    candidate: str = "candidate.onnx"
    workdir: Path = Path("retrain")
    since: str | None = None
    holdout: float = 0.2
    timeout_seconds: float = 3600.0
    env: dict[str, str] = field(default_factory=dict)
    trusted: bool = False
    #: Run on its own when the drift monitor first recommends retraining (once across processes).
    on_recommendation: bool = True

    @classmethod
    def from_dict(cls, raw: Any, base: Path, default_workdir: Path | None = None) -> RetrainSpec:
        """Validate a ``retrain:`` mapping; every problem is named by its key. Without ``workdir``,
        runs go to ``default_workdir`` (the serving config puts it in the data directory), else
        ``retrain/`` beside the config."""
        if not isinstance(raw, dict):
            raise ConfigError("retrain: must be a mapping with at least a command")
        problems = []
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            problems.append(f"unknown key(s) {unknown}; known keys are {sorted(_KEYS)}")
        command = raw.get("command")
        argv: list[str] = []
        if isinstance(command, str):
            try:
                argv = shlex.split(command)
            except ValueError as e:
                problems.append(f"command: cannot split {command!r}: {e}")
        elif isinstance(command, list) and all(isinstance(a, (str, int, float)) for a in command):
            argv = [str(a) for a in command]
        else:
            problems.append(f"command: must be a string or a list of strings, got {command!r}")
        if command is not None and not argv and not problems:
            problems.append("command: is empty")
        for a in [*argv, str(raw.get("candidate", ""))]:
            bad = _unknown_placeholders(a)
            if bad:
                problems.append(
                    f"command: unknown placeholder(s) {bad} in {a!r}; known: {list(PLACEHOLDERS)}"
                )
        candidate = raw.get("candidate", "candidate.onnx")
        if (
            not isinstance(candidate, str)
            or not candidate
            or Path(candidate).is_absolute()
            or ".." in Path(candidate).parts
        ):
            problems.append(
                f"candidate: must be a file name inside the run directory, got {candidate!r}"
            )
        holdout = raw.get("holdout", 0.2)
        if not _is_number(holdout) or not 0.0 <= holdout < 1.0:
            problems.append(f"holdout: must be a fraction in [0, 1), got {holdout!r}")
        timeout = raw.get("timeout_seconds", 3600.0)
        if not _is_number(timeout) or not math.isfinite(timeout) or timeout <= 0:
            problems.append(f"timeout_seconds: must be a positive number, got {timeout!r}")
        env = raw.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
            problems.append(f"env: must be a mapping of names to values, got {env!r}")
            env = {}
        since = raw.get("since")
        if since is not None and not isinstance(since, str):
            problems.append(f"since: must be an ISO time or a duration such as 30d, got {since!r}")
        trusted = raw.get("trusted", False)
        if not isinstance(trusted, bool):
            problems.append(f"trusted: must be true or false, got {trusted!r}")
        on_recommendation = raw.get("on_recommendation", True)
        if not isinstance(on_recommendation, bool):
            problems.append(f"on_recommendation: must be true or false, got {on_recommendation!r}")
        workdir = raw.get("workdir", str(default_workdir or "retrain"))
        if not isinstance(workdir, str) or not workdir:
            problems.append(f"workdir: must be a directory path, got {workdir!r}")
        if problems:
            raise ConfigError("retrain: " + "; ".join(problems))
        wd = Path(os.path.expandvars(workdir)).expanduser()
        return cls(
            command=tuple(argv),
            base=base,
            candidate=candidate,
            workdir=wd if wd.is_absolute() else base / wd,
            since=since,
            holdout=float(holdout),
            timeout_seconds=float(timeout),
            env={k: str(v) for k, v in env.items()},
            trusted=trusted,
            on_recommendation=on_recommendation,
        )

    def new_run_dir(self, now: float | None = None) -> Path:
        """``workdir/<UTC time>``, unique to the millisecond."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
        millis = int(((now if now is not None else time.time()) % 1) * 1000)
        return self.workdir / f"{stamp}.{millis:03d}Z"

    def plan(
        self, *, run_dir: Path, config: Path, profile: Path, target: str, task: str
    ) -> RetrainPlan:
        """The run in ``run_dir``, placeholders filled in (pure: nothing is created or run)."""
        values = {
            "export": str(run_dir / EXPORT_FILE),
            "run_dir": str(run_dir),
            "config": str(config),
            "profile": str(profile),
            "target": target,
            "task": task,
            "python": sys.executable,
        }
        candidate = run_dir / self.candidate.format_map(values)
        values["candidate"] = str(candidate)
        argv = tuple(a.format_map(values) for a in self.command)
        env = {**self.env, **{f"GUARDED_SERVING_{k.upper()}": v for k, v in values.items()}}
        return RetrainPlan(
            argv=argv,
            env=env,
            cwd=self.base,
            run_dir=run_dir,
            export=Path(values["export"]),
            candidate=candidate,
            log=run_dir / LOG_FILE,
            timeout_seconds=self.timeout_seconds,
        )


@dataclass(frozen=True)
class RetrainResult:
    candidate: Path
    log: Path
    seconds: float


def run(plan: RetrainPlan) -> RetrainResult:
    """Run the training script (no shell), its output into ``plan.log``; RetrainError unless it
    exits 0 and writes the candidate. The export must already be at ``plan.export``."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    log.info("retraining: %s (in %s)", shlex.join(plan.argv), plan.cwd)
    with plan.log.open("w") as out:
        try:
            proc = subprocess.run(
                plan.argv,
                cwd=plan.cwd,
                env={**os.environ, **plan.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=plan.timeout_seconds,
                check=False,
            )
        except FileNotFoundError as e:
            raise RetrainError(
                f"cannot run the retrain command {plan.argv[0]!r}: {e.strerror}"
            ) from e
        except subprocess.TimeoutExpired:
            raise RetrainError(
                f"the retrain command ran longer than {plan.timeout_seconds:g} s and was "
                f"stopped; its output is in {plan.log}"
            ) from None
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RetrainError(
            f"the retrain command exited with status {proc.returncode} after {seconds:.1f} s; "
            f"last output:\n{_tail(plan.log)}"
        )
    if not plan.candidate.is_file():
        raise RetrainError(
            f"the retrain command succeeded but wrote no candidate at {plan.candidate}; "
            f"last output:\n{_tail(plan.log)}"
        )
    return RetrainResult(plan.candidate, plan.log, seconds)


def load_candidate(ref: str | Path, *, task: str, trusted: bool = False) -> Any:
    """A candidate model through the serving adapters: a file (.onnx, or a trusted .joblib/.pkl),
    a BentoML model-store directory, or ``module:function``."""
    from .adapters import load_model

    p = Path(ref)
    if p.exists() or ":" not in str(ref):
        return load_model(p, task=task, trusted=trusted)
    return load_model(callable_ref=str(ref), task=task)


def split_holdout(
    rows: pd.DataFrame, target: str, fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training export, holdout): the newest ``fraction`` of the rows with an outcome (by ``ts``)
    form the holdout; every other row, with or without an outcome, stays in the export.

    >>> df = pd.DataFrame({"ts": [1, 2, 3, 4, 5], "y": [1.0, None, 3.0, 4.0, 5.0]})
    >>> train, hold = split_holdout(df, "y", 0.5)
    >>> train["ts"].tolist(), hold["ts"].tolist()
    ([1, 2, 3], [4, 5])
    """
    with_outcome = rows.index[rows[target].notna()] if target in rows else rows.index[:0]
    order = (
        rows.loc[with_outcome, "ts"].sort_values(kind="mergesort").index
        if "ts" in rows
        else with_outcome
    )
    n_hold = int(round(len(order) * fraction))
    held = order[len(order) - n_hold :] if n_hold else order[:0]
    keep = ~rows.index.isin(held)
    return rows[keep], rows.loc[rows.index.isin(held)]


def _unknown_placeholders(text: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError:
        return [text]
    return [n for n in names if n not in PLACEHOLDERS]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"
