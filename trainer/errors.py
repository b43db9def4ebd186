"""The trainer's error tree.

Every error carries a stable ``code`` (callers map on it, never on the message) and a message
that says what to change. ``NotEnoughData`` and its subclasses are business outcomes (a run ends
cleanly with the reason); the rest are bad input or a broken artifact.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BaseModelUnavailable",
    "CorruptAdapter",
    "InvalidFeedback",
    "InvalidSpec",
    "NotEnoughData",
    "OneSidedFeedback",
    "TrainerError",
    "TrainingCancelled",
    "TrainingDiverged",
    "UnknownBaseModel",
]


class TrainerError(Exception):
    """Base of every error raised on purpose by :mod:`trainer`."""

    code: ClassVar[str] = "trainer_error"


class NotEnoughData(TrainerError):
    """Too little usable feedback to build a dataset or run the requested method."""

    code = "not_enough_data"


class OneSidedFeedback(NotEnoughData):
    """All feedback has the same rating, so there is nothing to prefer against."""

    code = "one_sided_feedback"


class InvalidFeedback(TrainerError):
    """A feedback record (or a line of a feedback file) is malformed."""

    code = "invalid_feedback"


class UnknownBaseModel(TrainerError):
    """The base-model name is neither registered nor a local model directory."""

    code = "unknown_base_model"


class BaseModelUnavailable(TrainerError):
    """The base model is registered but its weights are not installed here."""

    code = "base_model_unavailable"


class InvalidSpec(TrainerError):
    """A training spec, gate policy or CLI option has an invalid value."""

    code = "invalid_spec"


class CorruptAdapter(TrainerError):
    """An adapter directory is missing files, unreadable, or does not match its checksum."""

    code = "corrupt_adapter"


class TrainingDiverged(TrainerError):
    """The loss (or the trained weights) became NaN or infinite."""

    code = "training_diverged"


class TrainingCancelled(TrainerError):
    """Training was stopped by the progress callback (e.g. a cancelled workflow).

    The last saved checkpoint stays on disk, so ``resume=True`` continues from it.
    """

    code = "training_cancelled"

    def __init__(self, message: str = "training was cancelled", *, step: int | None = None):
        super().__init__(message)
        self.step = step
