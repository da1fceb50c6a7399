"""``topoxr.verify``: read every chunk of a store once and check every invariant."""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr

from topoxr.conventions import ACTIVATION, ATTR_SAVING, COMMITTED, SAMPLE
from topoxr.store._errors import StoreError
from topoxr._chunkio import consolidate, read_selection
from topoxr.store._integrity import (
    Context,
    check_model_name,
    child_groups,
    children,
    chunk_coords,
    chunk_file,
    chunk_slices,
    consistent_snapshot,
    layer_arrays,
    lost_nodes,
    lost_nodes_message,
    missing_chunks,
    region_of,
    stored_chunks,
)
from topoxr.store._location import _locate, _open_root_readonly
from topoxr.store._schema import SAMPLE_FILL, _ATTR_READY, _ids_text, _where, has_checksums

__all__ = ["ATTR_VERIFIED", "Problem", "VerifyReport", "unready_layer_damage", "verify"]

logger = logging.getLogger(__name__)

#: Root attribute holding the outcome of the last :func:`verify` (dropped by a writer).
ATTR_VERIFIED = "topoxr_verified"


@dataclass
class Problem:
    """One problem found by :func:`verify`."""

    node: str  #: the model or layer node, e.g. ``"mlp/hidden"``
    what: str  #: the whole message: file, array, chunk, what is wrong, what it affects
    kind: str = "damaged"  #: ``"damaged"`` or ``"unverifiable"`` (no checksums)

    def line(self) -> str:
        """The one-line text printed by ``topoxr verify``."""
        return f"{self.node}: {self.kind}: {self.what}"


@dataclass
class VerifyReport:
    """What :func:`verify` found."""

    store: str
    chunks_read: int = 0
    layers: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every layer is checked and nothing is wrong."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``topoxr verify --json``).

        Returns
        -------
        dict of str to object
            ``"store"`` (the store's URL), ``"ok"`` (:attr:`ok`), ``"layers"`` (the number
            of layers checked), ``"chunks_read"`` and ``"problems"``: one dict per
            :class:`Problem`, its fields ``node``, ``what`` and ``kind`` plus ``line`` (the
            text of :meth:`Problem.line`).
        """
        return {"store": self.store, "ok": self.ok, "layers": self.layers,
                "chunks_read": self.chunks_read,
                "problems": [asdict(p) | {"line": p.line()} for p in self.problems]}


def verify(store: Any, *, storage_options: Mapping[str, Any] | None = None,
           progress: bool = False, record: bool = True) -> VerifyReport:
    """Read every chunk of a store once; check checksums and the store's invariants.

    Parameters
    ----------
    store : str or os.PathLike
        Path or fsspec URL of the store.
    storage_options : mapping, optional
        Passed to fsspec for URLs.
    progress : bool, default False
        Show a progress bar over the chunks.
    record : bool, default True
        Store the outcome in the root attribute ``topoxr_verified`` (shown by
        ``topoxr info``). Nothing is recorded while a writer holds the store, nor when
        the store changed while it was read (a writer wrote to it, a layout was saved):
        the outcome would then vouch for data it never read. It is logged instead
        (INFO, WARNING). A record thus says that at its time every chunk of the store
        was read and checked.

    Returns
    -------
    VerifyReport
        Every problem found, one :class:`Problem` each (``report.ok`` when none).

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``store``.
    StoreError
        If it is not a topoxr store.
    """
    from tqdm.auto import tqdm

    loc = _locate(store, storage_options)
    root = _open_root_readonly(loc)
    before = _fingerprint(loc.store) if record else None
    report = VerifyReport(store=loc.url)
    layers: list[tuple[str, zarr.Group]] = []
    errors: list[str] = []
    for path in lost_nodes(root):
        report.problems.append(Problem("/".join(path.split("/")[:2]),
                                       lost_nodes_message(loc.url, [path])))
    models = child_groups(root, errors)
    for model_name, model_group in models:
        try:
            check_model_name(model_name, model_group)
        except StoreError as err:
            report.problems.append(Problem(model_name, str(err)))
        members = children(model_group, errors)
        for layer_name, group in sorted(members.items()):
            if not isinstance(group, zarr.Group):
                continue
            node = f"{model_name}/{layer_name}"
            if group.attrs.get(_ATTR_READY, False):
                layers.append((node, group))
            elif (damage := unready_layer_damage(group)) is not None:
                report.problems.append(Problem(node, damage))
    report.problems.extend(Problem(msg.split("/zarr.json")[0], msg) for msg in errors)
    with tqdm(total=None, desc="verify", unit="chunk", disable=not progress) as bar:
        for node, group in layers:
            report.layers += 1
            try:
                # listed once: a damaged child is one problem
                damaged: list[str] = []
                members = children(group, damaged)
                report.problems.extend(Problem(node, msg) for msg in damaged)
                if not damaged:
                    _verify_layer(report, node, group, layer_arrays(group, members), bar)
                _verify_auxiliary(report, node, group, bar, members=members)
            except Exception as err:
                report.problems.append(Problem(node, f"unreadable ({type(err).__name__}: "
                                                     f"{err})"))
    if record:
        _record(loc, report, before)
    return report


def unready_layer_damage(group: zarr.Group) -> str | None:
    """The damage of a layer group that lacks its "ready" mark but holds committed data.

    A writer marks a layer ready (attribute ``topoxr_ready``) after creating its arrays
    and before its first commit, and stores chunks of ``committed`` and ``sample`` only
    when it commits. A layer without the mark and without such data was left
    half-created by a crashed writer (the next writer removes it); one with such data
    lost its mark (an edited or replaced ``zarr.json``): damage, never to be deleted.

    Parameters
    ----------
    group : zarr.Group
        A layer group.

    Returns
    -------
    str or None
        A message naming the layer, what it holds and what to do; None for a ready
        layer and for one holding nothing committed.
    """
    mark = group.attrs.get(_ATTR_READY)
    if mark:
        return None
    held = []
    for key, fill, what in ((COMMITTED, False, "committed cells"),
                            (SAMPLE, SAMPLE_FILL, "sample ids")):
        try:
            arr = zarr.open_array(group.store, path=f"{group.path}/{key}", mode="r")
        except Exception:  # not created yet (a writer died creating the layer)
            continue
        if not stored_chunks(arr):
            continue
        try:
            values = read_selection(arr)
        except Exception as err:
            held.append(f"{key!r} chunks that cannot be read ({type(err).__name__}: {err})")
            continue
        if count := int(np.count_nonzero(values != fill)):
            held.append(f"{count} {what}")
    if not held:
        return None
    state = "is missing" if mark is None else f"is {mark!r}"
    return (f"{_where(group)} is damaged: its attribute {_ATTR_READY!r} {state}, but it "
            f"holds {' and '.join(held)} (a writer sets the attribute before a layer's "
            "first commit): this is no layer half-created by a crashed writer, and it is "
            f"not deleted. If its arrays are intact, set {_ATTR_READY!r} to true in its "
            "zarr.json and run `topoxr verify`; otherwise delete the layer (or record the "
            "model again with mode='w')")


def _fingerprint(store: Any) -> str:
    """A digest of what a writer changes in ``store``: its keys, and the bytes of every
    key but the activation chunks (a writer rewrites those only with the ``committed``
    mask of a commit, or with the layer's ``topoxr_generation`` when it overwrites)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def digest() -> str:
        keys = sorted([k async for k in store.list()])
        read = [k for k in keys
                if k.endswith("zarr.json") or f"/{ACTIVATION}/" not in f"/{k}"]
        values = await asyncio.gather(*(store.get(k, default_buffer_prototype())
                                        for k in read))
        out = hashlib.sha256("\n".join(keys).encode())
        for key, value in zip(read, values, strict=True):
            out.update(key.encode() + b"\0" + (b"" if value is None else value.to_bytes()))
        return out.hexdigest()

    return sync(digest())


def _verify_layer(report: VerifyReport, node: str, group: zarr.Group,
                  arrays: dict[str, zarr.Array], bar: Any) -> None:
    where = _where(group)
    if not all(has_checksums(a) for a in arrays.values()):
        report.problems.append(Problem(
            node, f"{where} was written without chunk checksums (an earlier topoxr): damage "
            "to its chunks cannot be detected", kind="unverifiable"))
    snap = None
    try:
        arrays, snap = consistent_snapshot(group, arrays)
    except StoreError as err:
        report.problems.append(Problem(node, str(err)))
    except Exception as err:
        report.problems.append(Problem(node, f"{where} is unreadable "
                                             f"({type(err).__name__}: {err})"))
    ctx = snap.context if snap is not None else Context(where)
    for arr in arrays.values():
        # a missing activation chunk is damage only where it holds committed values
        # (checked below); the other arrays' missing chunks, by the snapshot
        _read_every_chunk(report, node, ctx, arr, bar, missing_is_damage=False)
    if snap is None:
        return
    for name in ("sample", "epoch"):
        values = snap.sample_ids if name == "sample" else snap.epochs
        uniq, counts = np.unique(values, return_counts=True)
        if (counts > 1).any():
            report.problems.append(Problem(node, f"{where}: the {name} coordinate repeats "
                                                 f"{_ids_text(uniq[counts > 1])}"))
    act = arrays[ACTIVATION]
    if snap.checked:
        region = region_of(act, snap.n, snap.m)
        size_s, size_e = act.chunks[1], act.chunks[2]
        for coords in missing_chunks(act, region):
            cells = snap.committed[coords[1] * size_s:(coords[1] + 1) * size_s,
                                   coords[2] * size_e:(coords[2] + 1) * size_e]
            if cells.any():
                report.problems.append(Problem(node, ctx.damaged_chunk(
                    act, coords, "holds committed values but is missing from the store")))


def _read_every_chunk(report: VerifyReport, node: str, ctx: Context, arr: zarr.Array,
                      bar: Any, *, missing_is_damage: bool) -> None:
    """Read every stored chunk of ``arr`` once; add a problem for each that fails (and,
    with ``missing_is_damage``, for each chunk absent from the store)."""
    try:
        present = stored_chunks(arr)
        grid = list(chunk_coords(arr, tuple(slice(None) for _ in arr.shape)))
    except Exception as err:
        report.problems.append(Problem(node, f"array {arr.basename!r} is unreadable "
                                             f"({type(err).__name__}: {err})"))
        return
    for coords in grid:
        if arr.metadata.encode_chunk_key(coords) not in present:
            if missing_is_damage:
                report.problems.append(Problem(node, ctx.damaged_chunk(
                    arr, coords, "is missing from the store")))
            continue
        bar.update()
        report.chunks_read += 1
        try:
            np.asarray(arr[chunk_slices(arr, coords)])
        except Exception as err:
            named = f"(file {chunk_file(arr, coords)})"
            if any(named in p.what for p in report.problems if p.node == node):
                continue  # reported already (the snapshot of the layer read it first)
            report.problems.append(Problem(node, ctx.damaged_chunk(
                arr, coords, f"cannot be read ({type(err).__name__}: {err})"
                if "checksum" not in str(err) else "fails its crc32c checksum")))


def _verify_auxiliary(report: VerifyReport, node: str, group: zarr.Group, bar: Any, *,
                      members: dict[str, Any] | None = None) -> None:
    """Check the groups below a layer (saved layouts): every chunk read, none missing
    (``members``: the children of ``group``, listed and their damage reported already)."""
    errors: list[str] = []
    for name, child in child_groups(group, errors, members=members):
        where = f"{node}/{name}"
        if child.attrs.get(ATTR_SAVING):
            report.problems.append(Problem(where, f"group {child.path!r} was not saved "
                                                  "completely (saving failed or was "
                                                  "interrupted): save it again or delete it"))
            continue
        ctx = Context(f"group {child.path!r}")
        arrays = sorted(child.arrays())
        unchecked = [key for key, arr in arrays if not has_checksums(arr)]
        if unchecked:
            report.problems.append(Problem(
                where, f"group {child.path!r} was written without chunk checksums (an "
                f"earlier topoxr; arrays {unchecked}): damage to its chunks cannot be "
                "detected", kind="unverifiable"))
        for key, arr in arrays:
            # every chunk of a checked array is stored: a missing one is damage
            _read_every_chunk(report, where, ctx, arr, bar,
                              missing_is_damage=key not in unchecked)
        _verify_auxiliary(report, where, child, bar)
    report.problems.extend(Problem(node, msg) for msg in errors)


def _record(loc: Any, report: VerifyReport, before: str | None) -> None:
    """Store the outcome in the root attributes, if no writer holds the store and the
    store is what it was before verify read it (``before``: its :func:`_fingerprint`)."""
    from topoxr._locking import StoreLockedError, WriterLock

    if loc.read_only is not None:
        logger.info("%s is %s: the verification is not recorded", loc.url, loc.read_only)
        return
    lock = WriterLock(loc.url, local_dir=loc.local_dir, fs=loc.fs, lock_path=loc.lock_path)
    try:
        lock.acquire()
    except StoreLockedError:
        logger.info("%s is being written: the verification is not recorded", loc.url)
        return
    try:
        if lost_nodes(_open_root_readonly(loc)):
            # recording rewrites the listing from the folders there are: the record of
            # what was lost would go with it
            logger.warning("%s has lost nodes (reported): the outcome is not recorded",
                           loc.url)
            return
        if _fingerprint(loc.store) != before:
            logger.warning("%s changed while verify read it (a writer or a saved layout "
                           "wrote to it): the outcome is not recorded; run verify again",
                           loc.url)
            return
        root = zarr.open_group(loc.store, mode="r+", use_consolidated=False)
        root.update_attributes({ATTR_VERIFIED: {
            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "problems": len(report.problems),
            "damaged": sum(p.kind == "damaged" for p in report.problems),
            "unverifiable": sum(p.kind == "unverifiable" for p in report.problems),
        }})
        consolidate(loc.store)
    except Exception as err:
        logger.info("could not record the verification in %s (%s)", loc.url, err)
    finally:
        lock.release()
