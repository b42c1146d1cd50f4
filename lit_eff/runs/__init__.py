"""Running, stopping and resuming: checkpoints that survive interrupts, checks on resumes."""

from lit_eff.runs.checkpoint import ResumableCheckpoint

__all__ = ["ResumableCheckpoint"]
