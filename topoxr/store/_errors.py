"""The errors of the activation store."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class StoreError(ValueError):
    """A store problem: bad input (nothing was written) or a store that cannot be used."""


class StoreWriteError(StoreError):
    """Writing to the store failed (disk full, network, permissions...).

    Everything committed before the failure is intact; the writer that failed refuses
    further writes, and a new :class:`ActivationWriter` resumes the recording.
    """


class StoreCorruptionError(StoreError):
    """A committed chunk of the store is unreadable or missing."""
