"""The loop's counts that a checkpoint keeps."""

from __future__ import annotations


class Counters:
    """The step, skipped steps and samples, the current epoch's loss sum, and the collapse monitor.

    state_dict() is the checkpoint's `counters` entry; `step` and `skipped_samples` (this rank's) are
    stored beside it by the checkpoint manager.
    """

    def __init__(self, collapse):
        self.collapse = collapse
        self.step = 0
        self.skipped_samples = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0

    def epoch_loss(self) -> float:
        """The mean loss of the current epoch's trained steps so far."""
        return self.epoch_loss_sum / max(1, self.epoch_loss_count)

    def state_dict(self) -> dict:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count,
            "collapse": self.collapse.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.epoch_loss_sum = state["epoch_loss_sum"]
        self.epoch_loss_count = state["epoch_loss_count"]
        self.collapse.load_state_dict(state.get("collapse", {}))
