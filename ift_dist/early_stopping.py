"""Early stopping as a resumable state machine: the best value of one eval metric, its step, and the evaluations since.

At every evaluation `update` compares the metric with the best value so far. It improves when it beats the best by
more than min_delta in the metric's direction (HF's EarlyStoppingCallback with early_stopping_threshold); the first
value always does. Each evaluation that does not improve counts one; `patience` of them in a row stop the run
(patience 0: never, the best value is still tracked for checkpoint.keep_best). A non-finite value never improves.
The state is a few numbers, kept in train_state.json, so a resumed run continues counting.
"""

from __future__ import annotations

import math
from typing import Any

from ift_dist.config import EarlyStoppingConfig, MetricMode


class EarlyStopping:
    """The best value of train.early_stopping.metric, the step it was reached at, and the evaluations since."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.metric = cfg.metric
        self.mode = cfg.resolved_mode()
        self.patience = cfg.patience
        self.min_delta = cfg.min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0  # evaluations in a row without improvement

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == MetricMode.min:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, step: int, scores: dict[str, Any]) -> bool:
        """One evaluation's metrics (the records of metrics.jsonl merged) after step `step`; True if the watched
        metric improved on the best (the new best is then this step)."""
        if self.metric not in scores:
            keys = ", ".join(sorted(key for key in scores if key != "step")) or "none"
            raise KeyError(
                f"train.early_stopping.metric {self.metric!r} is not among the evaluation's metrics: {keys}"
            )
        value = float(scores[self.metric])
        if self.improves(value):
            self.best, self.best_step, self.bad_evaluations = value, step, 0
            return True
        self.bad_evaluations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evaluations >= self.patience

    def reason(self) -> str:
        """Why the run stops, for the log."""
        return (
            f"early stopping: {self.metric} has not improved by more than {self.min_delta:g} ({self.mode}) for "
            f"{self.bad_evaluations} evaluations (train.early_stopping.patience={self.patience}); the best was "
            f"{self.best:.6g} at step {self.best_step}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": str(self.mode),
            "best": self.best,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["metric"] != self.metric or state["mode"] != str(self.mode):
            raise ValueError(
                f"the checkpoint's early stopping watched {state['metric']} ({state['mode']}), this run "
                f"{self.metric} ({self.mode})"
            )
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.bad_evaluations = int(state["bad_evaluations"])
