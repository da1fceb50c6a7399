"""The activation store: a streaming, crash-safe, resumable Zarr v3 writer and its reader.

Layout (see :mod:`topoxr.conventions` and ``docs/store-format.md``)::

    <store>/<model>/<layer>/activation  (neuron, sample, epoch) float32

Notes
-----
How crash safety works:

* Every chunk and metadata document is replaced atomically (zarr's local store writes a
  temporary file and renames it; object stores replace whole objects), so a killed
  writer never leaves a torn chunk and committed values that share a chunk with the
  batch being written are never lost.
* ``write`` buffers consecutive batches of a layer and epoch and commits them together
  (``buffer_bytes``), in whole chunks, so that every chunk is written once; arrays grow
  exactly to the data along ``sample`` and in powers of two along ``epoch``, and
  :meth:`ActivationWriter.close` (or the next writer after a crash) trims them. A flush
  commits every buffered layer in one set of steps (each step for all layers at once).
* A batch is written in a fixed order: first every array is grown if needed (new
  coordinate slots hold a fill value that no sample id or epoch can take), then every array that
  is not a coordinate is filled (values, labels, metadata, predictions; concurrently),
  then the ``sample``/``epoch`` coordinates that define the logical lengths, and last
  the ``committed`` mask.  The mask chunk is a multiple of the first batch size, so a
  commit of buffered batches becomes visible mask chunk by mask chunk, and each batch
  (of that size) in a single atomic chunk write.  The mask is stored
  uncompressed, so on local and in-memory stores that write is one direct, atomic
  store call rather than a trip through zarr's codec pipeline.
* Readers (:func:`open_store`) take the length all arrays agree on (cut before an
  unfilled coordinate slot) and the mask as a snapshot and hide everything not
  committed.  A reader running beside a writer therefore never sees a torn batch.  A
  committed chunk that is missing or does not decode raises
  :class:`StoreCorruptionError` naming layer, epochs and samples.  A layer that a
  writer replaced (``mode="w"``) or overwrote (``overwrite=True``) after the view was
  opened raises :class:`StoreChangedError` when the view's activations are read: each
  layer holds a token (``topoxr_generation``) that the writer renews before it changes
  committed values, and every read compares it with the view's.
* A writer opened on an existing model resumes: it repairs lengths left inconsistent
  by a crash (and unfilled coordinate slots), skips batches that are already committed
  (after checking that their values are identical) and writes the rest.
  :meth:`ActivationWriter.missing` tells a caller which samples still need computing.
* One writer per store: a ``flock`` on the store directory (released by the kernel when
  the process dies) or a lock object beside remote stores.

Modules, one job each:

* :mod:`._errors` -- the store's exceptions;
* :mod:`._location` -- paths and URLs resolved to a zarr store, the root group;
* :mod:`._schema` -- the layout of a layer (arrays, chunks, fill values, attributes) and
  the rules that read it back (logical lengths, required arrays);
* :mod:`._chunks` -- ordered whole-chunk writes, the commit-mask write;
* :mod:`._state` -- what a writer keeps in memory per layer;
* :mod:`._plan` -- checking a batch against the stored layer;
* :mod:`.writer` -- :class:`ActivationWriter`;
* :mod:`.reader` -- :func:`open_store`;
* :mod:`.summary` -- :func:`store_summary`;
* :mod:`._integrity` -- damaged chunks named, contradictions between arrays refused;
* :mod:`.verify` -- :func:`verify`, every chunk read once.
"""

from __future__ import annotations

from topoxr._locking import StoreLockedError
from topoxr.store._errors import (
    StoreChangedError,
    StoreCorruptionError,
    StoredValuesDifferError,
    StoreError,
    StoreWriteError,
)
from topoxr.store._plan import RESUME_TOLERANCE

# used by other topoxr modules (layouts saved into a store)
from topoxr.store._location import _locate as _locate
from topoxr.store._location import safe_node_name as safe_node_name
from topoxr.store._integrity import Context as Context
from topoxr.store._integrity import read_whole as read_whole
from topoxr.store._schema import MASK_CHUNK as MASK_CHUNK
from topoxr.store._schema import checked_array_spec as checked_array_spec
from topoxr.store._schema import SAMPLE_FILL as SAMPLE_FILL
from topoxr.store.reader import open_store
from topoxr.store.summary import store_summary
from topoxr.store.verify import VerifyReport, verify
from topoxr.store.writer import ActivationWriter

__all__ = [
    "RESUME_TOLERANCE",
    "ActivationWriter",
    "StoreChangedError",
    "StoreCorruptionError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "StoredValuesDifferError",
    "VerifyReport",
    "open_store",
    "store_summary",
    "verify",
]
