"""Checkpoints in object storage: atomic commit, verified resume, retention, world-size change (DESIGN §5)."""

from kubetune_trainer.checkpoint.manager import CheckpointManager, RestoredCheckpoint

__all__ = ["CheckpointManager", "RestoredCheckpoint"]
