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


class StoredValuesDifferError(StoreError):
    """Values written again for committed cells differ from the stored ones.

    A resumed recording writes samples the store may already hold: it is the same model
    only where it gives the same values (within rounding, see
    :data:`topoxr.store.RESUME_TOLERANCE`). Nothing of the batch is written.
    """


class StoreCorruptionError(StoreError):
    """A committed chunk of the store is unreadable or missing."""


class StoreChangedError(StoreError):
    """A layer read lazily was replaced or overwritten after the view was opened.

    A view of :func:`topoxr.open_store` reads its activations when they are computed; a
    writer that since replaced the layer (``mode="w"``) or overwrote its values
    (``overwrite=True``) would have them read with the coordinates of before. Open the
    store again.
    """
