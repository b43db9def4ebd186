"""Keep Hugging Face libraries' progress bars and rename warnings out of our output."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_hf"]


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence ``datasets``' and ``transformers``' progress bars and checkpointing renames.

    Our progress callback and logging report instead; the FutureWarnings come from TRL's own use
    of the ``gradient_checkpointing`` name, nothing a caller can act on.
    """
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as tf_logging

    ds_was, tf_was = ds_logging.is_progress_bar_enabled(), tf_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*gradient_checkpointing.*", FutureWarning)
            yield
    finally:
        if ds_was:
            ds_logging.enable_progress_bar()
        if tf_was:
            tf_logging.enable_progress_bar()
