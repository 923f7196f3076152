"""What a starting trainer finds in its run directory, before any model loads (standard library only, so the
command line can answer without importing torch):

- a completed run asked to ``--resume`` from its newest checkpoint with the same length: nothing to do (but
  export its final adapter again where ``--export-adapter`` asks and nothing is there);
- the saved ``train_config.json``, whose critical settings a resume must keep;
- a ``STOP`` file older than this trainer: left by an earlier stop request, it is removed, with a warning,
  instead of stopping the new run at once;
- ``metrics.jsonl`` lines past the step the run restarts from (steps to be redone, or a line cut short by a
  ``kill -9``): dropped, so that each step appears once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..common.fsutil import write_atomic
from .config import RESUME_CRITICAL, ConfigError, TrainConfig
from .status import STOP_FILE, read_status

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LENGTH_OPTIONS = ("max_steps", "epochs")  # a resume that changes these extends (or shortens) the run
STALE_MARGIN_SECONDS = 1.0  # file times may lag the clock by a tick: a STOP this close to the start counts
log = logging.getLogger("adapterd.trainer")


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's saved ``train_config.json``, or None when there is none."""
    try:
        return json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Save the run's settings, all at once: a crash leaves the old file or the new one."""
    write_atomic(run_dir / CONFIG_FILE, cfg.to_json())


def check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    """ConfigError naming the critical settings a resume would change (the first as its field). Checked before
    anything is written: a refused resume leaves the run's status.json as it was."""
    saved = saved_config(run_dir)
    if saved is None:
        return
    changed = [k for k in RESUME_CRITICAL if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ConfigError(changed[0], f"--resume with other settings than the run had: {', '.join(changed)} "
                                      f"(the run had {', '.join(f'{k}={saved[k]!r}' for k in changed)}; an exact "
                                      "resume needs the same ones)")


def completed_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's status when ``--resume`` (newest checkpoint) would have nothing to do: the run completed and
    the resume asks for the same length. An explicit ``--resume checkpoint-N`` redoes the steps after N."""
    if cfg.resume != "latest":
        return None
    status = read_status(cfg.run_dir)
    if status is None or status.get("state") != "completed":
        return None
    saved = saved_config(cfg.run_dir) or {}
    if any(name in saved and saved[name] != getattr(cfg, name) for name in LENGTH_OPTIONS):
        return None
    return status


def export_missing(cfg: TrainConfig, status: dict[str, Any]) -> Path | None:
    """For a completed run: copy its final adapter to ``--export-adapter`` when that is asked for and absent
    (deleted since, say); the only write a resume of a completed run makes. The path, or None."""
    if not cfg.export_adapter or Path(cfg.export_adapter).exists():
        return None
    from .checkpoint import export_adapter  # torch: only on this path

    final = Path(status.get("final_adapter") or cfg.run_dir / "final")
    return export_adapter(final, Path(cfg.export_adapter))


def clear_stale_stop(run_dir: Path, started_unix: float) -> bool:
    """Remove a STOP file written before this trainer started (``started_unix``, seconds since the epoch),
    saying so; a newer one is a request for this run and stays. True when one was removed."""
    path = run_dir / STOP_FILE
    try:
        written = path.stat().st_mtime
    except FileNotFoundError:
        return False
    if written >= started_unix - STALE_MARGIN_SECONDS:
        return False
    path.unlink(missing_ok=True)
    log.warning("removed %s, left by an earlier stop request (the run it stopped has ended): this run "
                "goes on; create it again to stop this one", path)
    return True


def _kept(line: str, step: int) -> bool:
    """Whether a metrics line is whole and of a step at most ``step``."""
    if not line.endswith("\n"):
        return False  # cut short by a kill
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the whole ``metrics.jsonl`` lines of steps 1..``step``, the steps the run restarts after;
    rewritten all at once (``write_atomic``), and only when something is dropped."""
    path = run_dir / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [line for line in lines if _kept(line, step)]
    if len(kept) == len(lines):
        return
    write_atomic(path, "".join(kept))
    log.info("%s: dropped %d lines past step %d (steps to be redone)", path.name, len(lines) - len(kept), step)
