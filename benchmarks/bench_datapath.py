"""The data path against the machine: writing, reading, NAPs and recording, as ratios.

Every figure is a ratio against a baseline timed in the same process, on the same disk,
from the same bytes (``python -m benchmarks datapath [--quick]``):

* **write**: :class:`topoxr.ActivationWriter` (512 neurons, batches of 256, 16 epochs,
  labels and predictions) against :func:`numpy.save` of the same activations, labels
  and predictions. Throughput ratio, target >= 0.3.
* **read**: every value of a store of about 2 GB (210 MB with ``quick``) read through
  :func:`topoxr.open_store` (a dask ``sum``) against reading the same bytes from raw
  ``.npy`` files, one per epoch (:func:`numpy.load` and ``sum``). Target >= 0.5.
* **naps**: :func:`topoxr.naps` ``(by="label")`` of that store, out of core, against
  numpy doing the same job out of core (each epoch's ``.npy`` loaded, then the fastest
  numpy group mean, a product with a one-hot matrix), and against the same product on
  data already in memory. Target >= 0.5 with peak RSS under 600 MB.
* **record_mlp**: ``topoxr_torch.record`` of every layer of the digits MLP (20,000
  samples, batch 256) against a hand-written hook writer that buffers whole chunks
  (``benchmarks.bench_adapters``). Target <= 1.2.
* **record_conv**: the same for a ResNet-18-sized network on 64x64 inputs (built here,
  no torchvision), against its bare forward pass. Target: recording adds <= 10 %
  (the ratio of the best of ``conv_repeats`` turns at ``conv_samples``; also the median
  over turns of each turn's ratio to the forward pass run just before it, and every
  turn's seconds, minor page faults and user/system CPU seconds; the recording's
  capture alone, pooling but storing nothing; the same turns at four times as many samples
  split what recording adds into a fixed part and a part per sample; ``parts``: the two
  taking turns once more, each run split by timestamps of the model's calls into the
  batches inside the model, the gaps between them and the time after the last one,
  where a recording's store does its last work). This child runs
  with glibc's allocator pinned (``STEADY_ALLOCATOR``: no heap trimming), so that the
  forward pass's maps do not land on fresh pages in some processes and not in others;
  the forward pass and the recording under glibc's defaults are reported beside it
  (``default_allocator``).
* **codecs**: bytes on disk against write and read speed of zstd levels, blosc
  (lz4/zstd with shuffle/bitshuffle) and no compression, on ReLU outputs (many exact
  zeros) and rounded normals, through zarr-python's codec pipeline and, where the
  ``zarrs`` package is installed, through its Rust pipeline; float16/bfloat16 storage
  with the error it costs.

Each measured section runs in a fresh child process (so peak RSS is its own, sampled
every 10 ms by a thread); topoxr and its baseline take turns ``REPEATS`` times and the
best time of each is kept (other work on a shared machine only adds time). Page caches
are warm for both (each is run once before timing); dirty pages are written back
(``os.sync``) before every section, untimed. The 1-minute load average before
and after every section is recorded. Scratch data lives in ``benchmarks/scratch/``; the
2 GB store is written once and reused while the store format and codec are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._child import run_sampled

SCRATCH = Path(__file__).parent / "scratch"
ROOT = Path(__file__).parent.parent
MB = 1 << 20
REPEATS = 3

SIZES = {
    False: {"write_samples": 8192, "read_samples": 102_400, "read_epochs": 10,
            "codec_samples": 16_384, "mlp_samples": 20_000, "conv_samples": 1024,
            "mlp_repeats": 5, "conv_repeats": 5},
    True: {"write_samples": 1024, "read_samples": 10_240, "read_epochs": 10,
           "codec_samples": 8192, "mlp_samples": 2000, "conv_samples": 128,
           "mlp_repeats": 1, "conv_repeats": 1},
}
NEURONS = 512
WRITE_BATCH = 256
WRITE_EPOCHS = 16
N_LABELS = 10
CONV_BATCH = 64
CONV_SIDE = 64


# -- helpers ----------------------------------------------------------------------------------
class PeakRSS:
    """Sample this process's resident set size every 10 ms while in the ``with`` block."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return round(self.peak / MB, 1)


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _turns(variants: dict[str, Callable[[], Any]], repeats: int,
           prepare: dict[str, Callable[[], Any]] | None = None,
           times_out: dict[str, list[float]] | None = None,
           faults_out: dict[str, list[int]] | None = None,
           cpu_out: dict[str, list[list[float]]] | None = None) -> tuple[dict, dict]:
    """Time the variants taking turns ``repeats`` times (after one warm-up each).

    ``prepare[key]``, where given, runs untimed before every run of variant ``key``
    (e.g. deleting the output of its previous run). Returns the best seconds and the
    peak RSS (MB) of each variant's timed runs; ``times_out``, where given, receives
    every timed run's seconds, in order, ``faults_out`` its minor page faults (each
    a fresh page of memory the kernel had to map and zero) and ``cpu_out`` the CPU
    seconds the process spent in it, ``[user, system]`` (every thread's, from
    :func:`os.times`; system time is the kernel's work for it, e.g. creating files).
    """
    import gc

    prepare = prepare or {}
    for key, fn in variants.items():
        prepare.get(key, lambda: None)()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, list[int]] = {k: [] for k in variants}
    cpu: dict[str, list[list[float]]] = {k: [] for k in variants}
    peaks: dict[str, float] = dict.fromkeys(variants, 0.0)
    for _ in range(repeats):
        for key, fn in variants.items():
            prepare.get(key, lambda: None)()
            gc.collect()
            with PeakRSS() as rss:
                f0 = _minor_faults()
                c0 = os.times()
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
                c1 = os.times()
                faults[key].append(_minor_faults() - f0)
                cpu[key].append([round(c1.user - c0.user, 2), round(c1.system - c0.system, 2)])
            peaks[key] = max(peaks[key], rss.mb)
    if times_out is not None:
        times_out.update(times)
    if faults_out is not None:
        faults_out.update(faults)
    if cpu_out is not None:
        cpu_out.update(cpu)
    return {k: min(v) for k, v in times.items()}, peaks


def _du(path: str | Path) -> int:
    """Bytes of every file under ``path``, each file once (hard links share one)."""
    seen: dict[tuple[int, int], int] = {}
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _entries(path: str | Path) -> dict[str, int]:
    """Folders, file names and the files' distinct inodes under ``path`` (its own folder
    counted): what creating it asked of the file system."""
    folders, names, inodes = 0, 0, set()
    for folder, _, files in os.walk(path):
        folders += 1
        names += len(files)
        inodes.update(os.stat(os.path.join(folder, name)).st_ino for name in files)
    return {"folders": folders, "file_names": names, "file_inodes": len(inodes)}


def relu_activations(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """ReLU outputs: about half exact zeros, the rest full-precision float32."""
    return np.maximum(rng.standard_normal(shape, dtype=np.float32), np.float32(0))


def rounded_activations(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values rounded to 1/64: about as compressible as trained activations."""
    return (np.round(rng.standard_normal(shape, dtype=np.float32) * 64) / 64).astype(np.float32)


@contextmanager
def _codec_pipeline(name: str) -> Iterator[None]:
    """Open arrays with zarr-python's codec pipeline (``"zarr"``) or zarrs' (``"zarrs"``)."""
    import zarr

    path = ("zarrs.ZarrsCodecPipeline" if name == "zarrs"
            else "zarr.core.codec_pipeline.BatchedCodecPipeline")
    with zarr.config.set({"codec_pipeline.path": path}):
        yield


def _zarrs_available() -> bool:
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    return True


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# -- write ------------------------------------------------------------------------------------
def _child_write(p: dict) -> dict:
    from topoxr import ActivationWriter

    n, tmp = p["write_samples"], p["tmp"]
    rng = np.random.default_rng(0)
    # a pool of distinct batches reused cyclically: generating data is not what is timed
    pool = [np.maximum(rounded_activations(rng, (WRITE_BATCH, NEURONS)), 0) for _ in range(8)]
    labels = np.arange(n) % N_LABELS
    nbytes = NEURONS * n * WRITE_EPOCHS * 4
    store = os.path.join(tmp, "write.zarr")

    def topoxr_writer() -> None:
        with ActivationWriter(store, model="bench", mode="w") as w:
            for epoch in range(WRITE_EPOCHS):
                for i, start in enumerate(range(0, n, WRITE_BATCH)):
                    stop = min(n, start + WRITE_BATCH)
                    w.write("hidden", pool[i % len(pool)][: stop - start],
                            sample=np.arange(start, stop), label=labels[start:stop],
                            prediction=(labels[start:stop] + epoch) % N_LABELS, epoch=epoch)

    # the same bytes, assembled in memory beforehand (not timed; a recording cannot)
    acts = np.empty((NEURONS, n, WRITE_EPOCHS), dtype=np.float32)
    preds = np.empty((n, WRITE_EPOCHS), dtype=np.int64)
    for epoch in range(WRITE_EPOCHS):
        for i, start in enumerate(range(0, n, WRITE_BATCH)):
            stop = min(n, start + WRITE_BATCH)
            acts[:, start:stop, epoch] = pool[i % len(pool)][: stop - start].T
            preds[start:stop, epoch] = (labels[start:stop] + epoch) % N_LABELS

    saved = [os.path.join(tmp, f"{name}.npy") for name in ("acts", "labels", "preds")]

    def numpy_save() -> None:
        for path, arr in zip(saved, (acts, labels, preds), strict=True):
            np.save(path, arr)

    def no_old_files() -> None:
        # both write new files: deleting the previous run's output is not timed
        for path in saved:
            if os.path.exists(path):
                os.unlink(path)

    best, peaks = _turns({"topoxr": topoxr_writer, "numpy_save": numpy_save}, REPEATS,
                         prepare={"topoxr": lambda: shutil.rmtree(store, ignore_errors=True),
                                  "numpy_save": no_old_files})
    _check_written(store, acts, labels, preds)
    return {"bytes": nbytes, "seconds": best, "peak_rss_mb": peaks,
            "bytes_on_disk": {"topoxr": _du(store),
                              "numpy_save": sum(os.path.getsize(os.path.join(tmp, f))
                                                for f in os.listdir(tmp) if f.endswith(".npy"))},
            "mb_per_s": {k: round(nbytes / v / 1e6, 1) for k, v in best.items()},
            "ratio": round(best["numpy_save"] / best["topoxr"], 3)}


def _check_written(store: str, acts: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> None:
    """The store holds the bytes ``np.save`` wrote (untimed): both did the same job."""
    import topoxr

    ds = topoxr.open_store(store)["bench/hidden"].to_dataset()
    np.testing.assert_array_equal(ds.activation.transpose("neuron", "sample", "epoch").values,
                                  acts)
    np.testing.assert_array_equal(ds.label.values, labels)
    np.testing.assert_array_equal(ds.prediction.transpose("sample", "epoch").values, preds)


# -- the 2 GB store and its raw copy ------------------------------------------------------------
def _store_tag() -> str:
    """Changes whenever the writer's on-disk format or codec may change."""
    import topoxr
    from topoxr._codecs import DEFAULT_COMPRESSOR
    from topoxr.conventions import FORMAT_VERSION
    from topoxr.store._schema import _TARGET_CHUNK_BYTES, CHUNK_KEYS, SAMPLE_MAJOR

    # the layout too: an editable install keeps its version while the layout changes
    layout = ("".join(map(str, SAMPLE_MAJOR.order)) + CHUNK_KEYS["separator"]
              + f"{_TARGET_CHUNK_BYTES >> 10}k")
    return f"{FORMAT_VERSION}-{topoxr.__version__}-{DEFAULT_COMPRESSOR}-{layout}"


def _big_data(p: dict) -> tuple[Path, Path]:
    """Write (once) the read/NAPs store and the same activations as one .npy per epoch."""
    from topoxr import ActivationWriter

    n, m = p["read_samples"], p["read_epochs"]
    base = Path(p.get("scratch", SCRATCH)) / f"datapath-{NEURONS}x{n}x{m}-{_store_tag()}"
    store, raw = base / "store.zarr", base / "raw"
    if store.exists() and raw.exists():
        return store, raw
    shutil.rmtree(base, ignore_errors=True)
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    labels = np.arange(n) % N_LABELS
    preferred = np.arange(NEURONS) % N_LABELS
    tmp = base / "store.partial"
    with ActivationWriter(str(tmp), model="bench", mode="w") as w:
        for epoch in range(m):
            epoch_values = np.empty((NEURONS, n), dtype=np.float32)
            for start in range(0, n, WRITE_BATCH):
                lab = labels[start:start + WRITE_BATCH]
                acts = rounded_activations(rng, (len(lab), NEURONS))
                acts += (lab[:, None] == preferred[None, :]) * np.float32(1 + epoch / m)
                np.maximum(acts, 0, out=acts)
                epoch_values[:, start:start + len(lab)] = acts.T
                w.write("hidden", acts, sample=np.arange(start, start + len(lab)), label=lab,
                        epoch=epoch)
            np.save(raw / f"epoch{epoch}.npy", epoch_values)
    np.save(raw / "labels.npy", labels)
    tmp.rename(store)
    return store, raw


def _raw_epochs(raw: Path) -> list[Path]:
    return sorted(raw.glob("epoch*.npy"), key=lambda f: int(f.stem.removeprefix("epoch")))


def _child_read(p: dict) -> dict:
    import topoxr

    store, raw = Path(p["store"]), Path(p["raw"])
    act = topoxr.open_store(str(store))["bench/hidden"].activation
    nbytes = act.size * 4
    sums = {}

    def store_read() -> None:
        sums["topoxr"] = float(act.data.sum(dtype=np.float64).compute(scheduler="threads"))

    def npy_read() -> None:
        sums["numpy"] = float(sum(np.load(f).sum(dtype=np.float64) for f in _raw_epochs(raw)))

    best, peaks = _turns({"topoxr": store_read, "numpy_npy": npy_read}, REPEATS)
    np.testing.assert_allclose(sums["topoxr"], sums["numpy"], rtol=1e-6)
    return {"bytes": int(nbytes), "seconds": best, "peak_rss_mb": peaks,
            "gb_per_s": {k: round(nbytes / v / 1e9, 3) for k, v in best.items()},
            "dask_chunks": [int(c[0]) for c in act.data.chunks],
            "ratio": round(best["numpy_npy"] / best["topoxr"], 3)}


def _child_naps(p: dict) -> dict:
    import topoxr

    store, raw = Path(p["store"]), Path(p["raw"])
    layer = topoxr.open_store(str(store))["bench/hidden"].to_dataset()
    nbytes = layer.activation.size * 4
    labels = np.load(raw / "labels.npy")
    groups = np.unique(labels)
    out: dict[str, np.ndarray] = {}

    def onehot() -> np.ndarray:
        m = (labels[:, None] == groups[None, :]).astype(np.float32)
        return m / m.sum(axis=0)

    def topoxr_naps() -> None:
        out["topoxr"] = topoxr.naps(layer, by="label", normalize=False).compute(
            scheduler="threads").values

    def numpy_out_of_core() -> None:
        h = onehot()
        out["numpy"] = np.stack([np.load(f) @ h for f in _raw_epochs(raw)], axis=2)

    # topoxr's out-of-core RSS first, before any in-memory copy exists in this process
    best, peaks = _turns({"topoxr": topoxr_naps, "numpy_out_of_core": numpy_out_of_core},
                         REPEATS)
    in_memory = [np.load(f) for f in _raw_epochs(raw)]

    def numpy_in_memory() -> None:
        h = onehot()
        out["memory"] = np.stack([a @ h for a in in_memory], axis=2)

    best_mem, peaks_mem = _turns({"numpy_in_memory": numpy_in_memory}, REPEATS)
    np.testing.assert_allclose(out["topoxr"], out["numpy"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["memory"], out["numpy"], rtol=1e-6)
    best.update(best_mem)
    peaks.update(peaks_mem)
    return {"bytes": int(nbytes), "seconds": best, "peak_rss_mb": peaks,
            "gb_per_s": {k: round(nbytes / v / 1e9, 3) for k, v in best.items()},
            "ratio": round(best["numpy_out_of_core"] / best["topoxr"], 3),
            "ratio_vs_in_memory": round(best["numpy_in_memory"] / best["topoxr"], 3)}


# -- recording --------------------------------------------------------------------------------
def _child_record_mlp(p: dict) -> dict:
    from benchmarks.bench_adapters import _inputs, _run_config, _Torch

    x, y = _inputs(p["mlp_samples"])
    tmp = tempfile.mkdtemp(prefix="topoxr-datapath-mlp-", dir=p["tmp"])
    # the file system's state before and after the turns (each deletes the last
    # recording's store), untimed: a recording makes about twice the folders and inodes
    # of the hand-written writer, and six times the file names (``entries``), so a slow
    # state slows the recording more
    inode_us = {"section_start": _inode_create_us(p["tmp"])}
    with PeakRSS() as rss:
        res = _run_config(_Torch(), "mlp", x, y, p["mlp_repeats"], tmp)
    inode_us["section_end"] = _inode_create_us(p["tmp"])
    res["inode_create_us"] = inode_us
    res["entries"] = {key: _entries(os.path.join(tmp, f"torch-mlp-{key}.zarr"))
                      for key in ("record", "direct")}
    res["peak_rss_mb"] = rss.mb
    res["bytes_on_disk"] = _du(os.path.join(tmp, "torch-mlp-record.zarr"))
    res["ratio"] = res["record_over_b_direct_whole_chunks"]
    return res


def resnet18(n_classes: int = 10) -> Any:
    """A ResNet-18 (basic blocks 2-2-2-2, 64-512 channels, 11.2 M parameters) in plain torch."""
    import torch
    from torch import nn

    torch.manual_seed(0)  # before the layers are made: the same weights in every run

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes)]
    return nn.Sequential(*layers).eval()


def _inode_create_us(folder: str, count: int = 200) -> float:
    """Microseconds to create one empty file in a new subfolder of ``folder`` (kept).

    A probe of the file system's state, untimed in the turns: on ext4 without a journal
    (this benchmark's machine), a new inode is not taken from those freed in the last
    60 s (300 s while their inode table block is not written back), and every
    allocation scans past them, so creating files where many were just deleted is
    slower (see docs/benchmarks.md, "Why creating files costs so much on this machine").
    """
    probe = tempfile.mkdtemp(prefix="inode-probe-", dir=folder)
    t0 = time.perf_counter()
    for i in range(count):
        os.close(os.open(os.path.join(probe, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    return round((time.perf_counter() - t0) / count * 1e6, 1)


def _pooled_capture(model: Any, layers: list[str], x: np.ndarray) -> Callable[..., Any]:
    """A run of ``model`` over ``x`` through the recording's capture, nothing stored.

    The capture pools the layers a recording pools (every 4-D output, the mean over its
    positions, see :func:`topoxr.recording.run_recording`), decided here from one
    sample, and returns ``(batch, neurons, 1)`` arrays, dropped; ``run(keep=True)``
    returns them instead, joined per layer as ``(samples, neurons)`` (see
    :func:`_check_captured_as_recorded`).
    """
    from topoxr_torch.recorder import capture

    def run(keep: bool = False) -> dict[str, np.ndarray] | None:
        kept: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        with capture(model, layers) as cap:
            outputs, _ = cap(x[:1])
            cap.pool.update({name: (cap.axes[name], "mean") for name, out in outputs.items()
                             if out.ndim > 2})
            for start in range(0, len(x), CONV_BATCH):
                outputs, _ = cap(x[start:start + CONV_BATCH])
                if keep:
                    for name, out in outputs.items():
                        kept[name].append(out.reshape(len(out), -1))
        return {name: np.concatenate(parts) for name, parts in kept.items()} if keep else None
    return run


def _recording_parts(model: Any, variants: dict[str, Callable[[], Any]], repeats: int,
                     prepare: dict[str, Callable[[], Any]]) -> dict[str, dict[str, float]]:
    """Where each variant's time goes, from two hooks on the whole model (reported).

    The variants take turns through :func:`_turns`; every call of ``model`` is
    timestamped as it starts and ends, which splits a run into the time
    ``before_first`` batch, ``in_model`` (the batches inside the model, a recording's
    hooks and pooling included), ``after_first_batch`` (from the end of the first batch
    to the start of the second: a recording opens its store there),
    ``between_later_batches`` and ``after_last`` batch (a recording's last flush,
    commit and consolidation). In each run the parts add up to its ``total``. Returns
    the median of each part over the timed runs (medians of parts need not add up
    exactly to the median total), in seconds, and ``batches``.
    """
    stamps: list[float] = []
    rows: dict[str, list[dict[str, float]]] = {key: [] for key in variants}

    def split(key: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            stamps.clear()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            starts, ends = np.array(stamps[0::2]), np.array(stamps[1::2])
            gaps = starts[1:] - ends[:-1]
            rows[key].append({
                "total": t1 - t0, "before_first": starts[0] - t0,
                "in_model": float((ends - starts).sum()),
                "after_first_batch": float(gaps[:1].sum()),
                "between_later_batches": float(gaps[1:].sum()),
                "after_last": t1 - ends[-1], "batches": len(starts)})
        return run

    hooks = [model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter())),
             model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))]
    try:
        _turns({key: split(key, fn) for key, fn in variants.items()}, repeats,
               prepare=prepare)
    finally:
        for hook in hooks:
            hook.remove()
    timed = {key: runs[1:] for key, runs in rows.items()}  # the first: _turns' warm-up
    return {key: {part: round(float(np.median([r[part] for r in runs])), 5)
                  for part in runs[0] if part != "batches"} | {"batches": runs[0]["batches"]}
            for key, runs in timed.items()}


def _check_captured_as_recorded(run: Callable[..., Any], store: str, model: str) -> None:
    """The capture variant computes what the recording stored (untimed): every layer's
    values equal the store's, so its time is the recording's capture and nothing else."""
    import topoxr

    tree = topoxr.open_store(store)[model]
    captured = run(keep=True)
    if sorted(captured) != sorted(tree.children):
        raise RuntimeError(f"the capture variant ran layers {sorted(captured)}, the "
                           f"recording stored {sorted(tree.children)}")
    for name, values in captured.items():
        stored = tree[name].to_dataset().activation.isel(epoch=0).transpose("sample", "neuron")
        np.testing.assert_array_equal(stored.values, values, err_msg=f"layer {name!r}")


def _child_record_conv(p: dict) -> dict:
    """Recording against the bare forward pass, for two probe-set sizes.

    The ratio of the target is taken at ``conv_samples``; the same turns at four times
    as many samples split what recording adds into a fixed part (creating the layers'
    arrays, the last commit, consolidation) and a part per sample, fitted through the
    two sizes: ``added(n) = fixed + per_sample * n``. At ``conv_samples`` more
    variants are reported beside the target, taking turns after the target's turns, in
    a block of their own with the forward pass again (``forward_beside_reported``, the
    denominator of their ratios): their untimed preparations create and delete hundreds
    of files, which would slow the target's turns on this machine's file system (see
    the comment in the code). They are ``ratio_capture_pooled``, the
    recording's capture alone (hooks and pooling, nothing stored: the method's own
    part of the overhead; checked untimed to compute every value the recording
    stored, :func:`_check_captured_as_recorded`); ``ratio_record_new_path`` (a new
    store path every run, nothing deleted until the turns end) and
    ``ratio_record_tmpfs`` (the store on ``/dev/shm``), to show how much of the
    overhead is the file system's; and
    ``ratio_record_later_epoch``: epoch 1 recorded into a store holding epoch 0 (a
    training loop's case). With ``p["slim"]``, only the forward pass and the target's
    recording take turns, at ``conv_samples`` (the run beside it under glibc's default
    allocator settings, see ``main``). Every turn's minor page faults and the process's
    user and system CPU seconds are reported, and (not slim) ``parts``: the forward
    pass and the target's recording taking turns once more at ``conv_samples``, each
    run split into parts by hooks on the whole model (:func:`_recording_parts`).
    """
    import torch

    import topoxr_torch

    model = resnet18()
    slim = bool(p.get("slim"))
    sizes = (p["conv_samples"],) if slim else (p["conv_samples"], 4 * p["conv_samples"])
    rng = np.random.default_rng(0)
    x_all = rng.standard_normal((sizes[-1], 3, CONV_SIDE, CONV_SIDE), dtype=np.float32)
    y_all = np.arange(sizes[-1]) % N_LABELS
    # every module with an output of its own: the stem, each block, the pooled features
    # and the classifier (ReLU modules inside blocks are functional, so no hook fires twice)
    layers = [name for name, _ in model.named_children()]
    path = os.path.join(p["tmp"], "resnet.zarr")
    by_samples: dict[int, dict[str, Any]] = {}
    # the file system's state, probed (untimed) at the start and right after the last
    # deletion of the store before a timed recording
    inode_us: dict[str, Any] = {"section_start": _inode_create_us(p["tmp"]),
                                "after_deleting_the_store": []}

    def delete_store() -> None:
        existed = os.path.exists(path)
        shutil.rmtree(path, ignore_errors=True)
        if existed:
            inode_us["after_deleting_the_store"].append(_inode_create_us(p["tmp"], 100))
    for n in sizes:
        x, y = x_all[:n], y_all[:n]

        def forward(x: np.ndarray = x) -> None:
            with torch.inference_mode():
                for start in range(0, len(x), CONV_BATCH):
                    model(torch.from_numpy(x[start:start + CONV_BATCH]))

        def record(x: np.ndarray = x, y: np.ndarray = y) -> None:
            topoxr_torch.record(model, (x, y), path, model_name="resnet18", layers=layers,
                                batch_size=CONV_BATCH, progress=False)

        variants: dict[str, Callable[[], Any]] = {"forward": forward, "record": record}
        # the reported variants take turns in a block of their own, after the target's
        # (the forward pass again beside them): their untimed preparations create and
        # delete hundreds of files (a copied store per turn), and on a file system that
        # allocates inodes more slowly after deletions (ext4 without a journal, this
        # machine's) that would slow the target's next turns, which are about the
        # recording, not about the variants' scratch files
        reported: dict[str, Callable[[], Any]] = {}
        prepare = {"record": delete_store}
        fresh = os.path.join(p["tmp"], "resnet-new-paths")
        if n == sizes[0] and not slim:
            # reported, not the target: the recording's capture alone (its hooks pool
            # every conv map as a recording does; nothing is stored), to split what
            # recording adds into the pooling's part and the store's
            reported["capture_pooled"] = _pooled_capture(model, layers, x)
            # reported, not the target: where the file system's part of the overhead goes.
            # (1) a new store path every run, none deleted until all turns are done: the
            # target's runs replace the store deleted just before, and ext4 allocates
            # inodes more slowly right after many were freed;
            counter = iter(range(1 << 30))

            def record_new_path(x: np.ndarray = x, y: np.ndarray = y) -> None:
                topoxr_torch.record(model, (x, y), os.path.join(fresh, f"{next(counter)}.zarr"),
                                    model_name="resnet18", layers=layers,
                                    batch_size=CONV_BATCH, progress=False)

            reported["record_new_path"] = record_new_path
            # (2) the store in memory-backed files (tmpfs), where creating a file is cheap
            shm = _tmpfs_dir()
            if shm is not None:
                shm_path = os.path.join(shm, "resnet.zarr")

                def record_tmpfs(x: np.ndarray = x, y: np.ndarray = y) -> None:
                    topoxr_torch.record(model, (x, y), shm_path, model_name="resnet18",
                                        layers=layers, batch_size=CONV_BATCH, progress=False)

                reported["record_tmpfs"] = record_tmpfs
                prepare["record_tmpfs"] = lambda: shutil.rmtree(shm_path, ignore_errors=True)
            # (3) the training-loop case: epoch 1 into a copy (untimed) of a store that
            # holds epoch 0, so that the recording checks and loads the stored layers
            seed = os.path.join(p["tmp"], "resnet-epoch0.zarr")
            later = os.path.join(p["tmp"], "resnet-later.zarr")
            topoxr_torch.record(model, (x, y), seed, model_name="resnet18", layers=layers,
                                batch_size=CONV_BATCH, progress=False)

            def record_later_epoch(x: np.ndarray = x, y: np.ndarray = y) -> None:
                topoxr_torch.record(model, (x, y), later, model_name="resnet18",
                                    layers=layers, batch_size=CONV_BATCH, progress=False,
                                    epoch=1)

            def copy_seed() -> None:
                shutil.rmtree(later, ignore_errors=True)
                shutil.copytree(seed, later)

            reported["record_later_epoch"] = record_later_epoch
            prepare["record_later_epoch"] = copy_seed
        repeats = p["conv_repeats"] if n == sizes[0] else max(1, p["conv_repeats"] - 2)
        turns: dict[str, list[float]] = {}
        faults: dict[str, list[int]] = {}
        cpu: dict[str, list[list[float]]] = {}
        block: tuple[dict, dict, dict] = ({}, {}, {})
        try:
            best, peaks = _turns(variants, repeats, prepare=prepare, times_out=turns,
                                 faults_out=faults, cpu_out=cpu)
            if reported:
                best_r, peaks_r = _turns({"forward": forward, **reported}, repeats,
                                         prepare=prepare, times_out=block[0],
                                         faults_out=block[1], cpu_out=block[2])
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
            if "record_tmpfs" in reported:
                shutil.rmtree(shm, ignore_errors=True)
        if reported:
            # the block's own forward pass is "forward_beside_reported": each reported
            # ratio is over it, timed in the same minutes
            for out, got in zip((turns, faults, cpu), block, strict=True):
                out["forward_beside_reported"] = got.pop("forward")
                out.update(got)
            best["forward_beside_reported"] = best_r.pop("forward")
            peaks["forward_beside_reported"] = peaks_r.pop("forward")
            best.update(best_r)
            peaks.update(peaks_r)
        by_samples[n] = {"seconds": best, "peak_rss_mb": peaks, "bytes_on_disk": _du(path),
                         "turn_seconds": {k: [round(t, 4) for t in v] for k, v in turns.items()},
                         "turn_minor_faults": faults,
                         "turn_cpu_user_system_seconds": cpu,
                         # each turn's record over the forward pass run just before it:
                         # drifts of the machine's speed between turns cancel
                         "median_turn_ratio": round(float(np.median(
                             np.array(turns["record"]) / np.array(turns["forward"]))), 3),
                         "added_seconds": round(best["record"] - best["forward"], 3),
                         "ratio": round(best["record"] / best["forward"], 3)}
        if n == sizes[0] and not slim:
            # reported, last: the same two variants taking turns once more, split into
            # parts by timestamps (hooks on the whole model, not on the target's turns)
            by_samples[n]["parts"] = _recording_parts(
                model, {"forward": forward, "record": record}, repeats, prepare)
        for key in reported:
            by_samples[n][f"ratio_{key}"] = round(best[key] / best["forward_beside_reported"], 3)
    if not slim:
        # untimed, after every timed turn: the capture variant computes what a recording
        # stores. Last, because keeping a whole pass's outputs raised the process's memory
        # high-water mark by about 370 MB (glibc's heap, pinned, is never trimmed), which
        # every later turn's peak RSS would show.
        n0 = sizes[0]
        checked = os.path.join(p["tmp"], "resnet-check.zarr")
        topoxr_torch.record(model, (x_all[:n0], y_all[:n0]), checked, model_name="resnet18",
                            layers=layers, batch_size=CONV_BATCH, progress=False)
        _check_captured_as_recorded(_pooled_capture(model, layers, x_all[:n0]), checked,
                                    "resnet18")
        shutil.rmtree(checked, ignore_errors=True)
    if slim:
        (n0, small), = by_samples.items()
        return {"samples": n0, **{k: small[k] for k in (
            "seconds", "peak_rss_mb", "turn_seconds", "turn_minor_faults",
            "turn_cpu_user_system_seconds",
            "median_turn_ratio", "added_seconds", "ratio")}}
    (n0, small), (n1, large) = by_samples.items()
    per_sample = (large["added_seconds"] - small["added_seconds"]) / (n1 - n0)
    fixed = small["added_seconds"] - per_sample * n0
    per_sample_forward = large["seconds"]["forward"] / n1
    return {"samples": n0, "batch": CONV_BATCH, "input": [3, CONV_SIDE, CONV_SIDE],
            "parameters": int(sum(t.numel() for t in model.parameters())),
            "layers": layers, "torch_threads": torch.get_num_threads(),
            "seconds": small["seconds"], "peak_rss_mb": small["peak_rss_mb"],
            "bytes_on_disk": small["bytes_on_disk"], "ratio": small["ratio"],
            "median_turn_ratio": small["median_turn_ratio"],
            "inode_create_us": inode_us,
            **{k: v for k, v in small.items() if k.startswith(("ratio_record_",
                                                                "ratio_capture_"))},
            "parts": small["parts"],
            "by_samples": by_samples,
            "added_fixed_seconds": round(fixed, 3),
            "added_per_sample_over_forward": round(per_sample / per_sample_forward, 3)}


def _tmpfs_dir() -> str | None:
    """A new folder in ``/dev/shm`` where that is a writable tmpfs, else None."""
    try:
        with open("/proc/mounts") as mounts:
            tmpfs = any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts)
        return tempfile.mkdtemp(prefix="topoxr-datapath-", dir="/dev/shm") if tmpfs else None
    except OSError:
        return None


# -- codecs -----------------------------------------------------------------------------------
def _codecs() -> dict[str, Any]:
    from zarr.codecs import BloscCodec, ZstdCodec

    out: dict[str, Any] = {"none": None}
    for level in (1, 3, 5):
        out[f"zstd-{level}"] = ZstdCodec(level=level)
    for cname in ("lz4", "zstd"):
        for shuffle in ("shuffle", "bitshuffle"):
            for clevel in ((5,) if cname == "lz4" else (1, 5)):
                out[f"blosc-{cname}{clevel}-{shuffle}"] = BloscCodec(
                    cname=cname, clevel=clevel, shuffle=shuffle)
    return out


def _child_codecs(p: dict) -> dict:
    import zarr

    n = p["codec_samples"]
    rng = np.random.default_rng(2)
    shape = (NEURONS, n, 1)
    data = {"relu": relu_activations(rng, shape), "rounded": rounded_activations(rng, shape)}
    pipelines = ["zarr", *(["zarrs"] if _zarrs_available() else [])]
    chunk = (NEURONS, 512, 1)  # 1 MiB, the writer's chunk at batch 256
    path = os.path.join(p["tmp"], "codec.zarr")
    rows = []
    for kind, values in data.items():
        for name, codec in _codecs().items():
            for pipeline in pipelines:
                with _codec_pipeline(pipeline):
                    shutil.rmtree(path, ignore_errors=True)
                    arr = zarr.create_array(path, shape=shape, chunks=chunk, dtype="float32",
                                            fill_value=np.nan,
                                            compressors=None if codec is None else [codec])
                    box: dict[str, np.ndarray] = {}

                    def write(arr: Any = arr, values: np.ndarray = values) -> None:
                        arr[...] = values

                    def read(arr: Any = arr, box: dict = box) -> None:
                        box["v"] = arr[...]

                    best, _ = _turns({"write": write, "read": read}, REPEATS)
                if not np.array_equal(box["v"], values):
                    raise AssertionError(f"{name} via {pipeline} did not round-trip")
                rows.append({"data": kind, "codec": name, "pipeline": pipeline,
                             "ratio": round(values.nbytes / _du(path), 3),
                             "write_mb_s": round(values.nbytes / best["write"] / 1e6),
                             "read_mb_s": round(values.nbytes / best["read"] / 1e6)})
    precision = {}
    for kind, values in data.items():
        import ml_dtypes

        for dtype in ("float16", ml_dtypes.bfloat16):
            back = values.astype(dtype).astype(np.float32)
            err = np.abs(back - values)
            rel = err[values != 0] / np.abs(values[values != 0])
            precision[f"{kind}-{np.dtype(dtype).name}"] = {
                "max_abs_error": float(err.max()), "max_rel_error": float(rel.max()),
                "mean_rel_error": float(rel.mean()),
                "zeros_exact": bool((back[values == 0] == 0).all())}
    return {"bytes_per_array": NEURONS * n * 4, "chunk": list(chunk), "rows": rows,
            "reduced_precision": precision}


# -- driver -----------------------------------------------------------------------------------
def _child(name: str, params: dict) -> None:
    """Entry point of a section's child process: print its result as one JSON line."""
    sys.stdout.write(json.dumps(globals()[f"_child_{name}"](params), default=float) + "\n")


def _run_child(name: str, params: dict, env: dict[str, str] | None = None) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from benchmarks.bench_datapath import _child; _child({name!r}, {params!r})")
    before = _load()
    res, peak = run_sampled(code, env=env)
    res["child_peak_rss_mb"] = round(peak / MB, 1)
    res["load_average_before_after"] = [before, _load()]
    return res


SECTIONS = ("codecs", "write", "read", "naps", "record_mlp", "record_conv")
#: glibc's allocator settings of the ResNet section's main child: blocks up to 32 MiB
#: (the largest threshold glibc takes) come from the heap, and the heap is never
#: trimmed. Under the defaults, whether the forward pass's 16.7 MB maps land on pages
#: the process already has or on fresh pages (mapped and zeroed by the kernel) depends
#: on what else sits in the heap: the bare forward pass took 0 or 127,000-206,000
#: minor faults per 1024 samples from one process to the next, and a recording could
#: change it for the passes after it. Pinned, both variants run on pages the process
#: has (0 faults per bare pass), so the ratio measures what recording adds, not where
#: the allocator happened to put the maps. The same turns under the defaults are
#: reported beside it (``default_allocator``).
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                    "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
TARGETS = {"write": ">= 0.3 (throughput over np.save)",
           "read": ">= 0.5 (throughput over raw .npy)",
           "naps": ">= 0.5 (throughput over numpy out of core), peak RSS < 600 MB",
           "record_mlp": "<= 1.2 (time over a whole-chunk hook writer)",
           "record_conv": "<= 1.1 (time over the bare forward pass)"}


def main(quick: bool = False, sections: tuple[str, ...] | None = None, *,
         sizes: dict[str, int] | None = None, scratch: str | Path | None = None) -> dict:
    """Run the data-path benchmark; see the module docstring.

    Parameters
    ----------
    quick : bool, default False
        Small sizes and one repeat, for a smoke run.
    sections : tuple of str, optional
        Which sections to run (default all; the environment variable
        ``TOPOXR_BENCH_SECTIONS``, comma-separated, also selects).
    sizes : dict of str to int, optional
        Entries of ``SIZES`` to replace (the test suite runs every section at tiny
        sizes); an unknown key is refused.
    scratch : str or Path, optional
        Folder for the scratch data and the cached 2 GB store (default
        ``benchmarks/scratch``).

    Returns
    -------
    dict
        Per section its seconds, throughputs, peak RSS, bytes on disk and ratio; the
        ratios with their targets under ``"ratios"``.
    """
    chosen = sections or tuple(s for s in os.environ.get("TOPOXR_BENCH_SECTIONS", "").split(",")
                               if s) or SECTIONS
    unknown = sorted(set(sizes or ()) - set(SIZES[quick]))
    if unknown:
        raise ValueError(f"unknown sizes {unknown}; known: {sorted(SIZES[quick])}")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    params: dict[str, Any] = dict(SIZES[quick]) | dict(sizes or {})
    scratch = Path(scratch) if scratch is not None else SCRATCH
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="datapath-", dir=scratch)
    params |= {"tmp": tmp, "scratch": str(scratch)}
    result: dict[str, Any] = {"sizes": {k: params[k] for k in SIZES[quick]},
                              "zarrs": _zarrs_available(), "repeats": REPEATS}
    try:
        if {"read", "naps"} & set(chosen):
            t0 = time.perf_counter()
            store, raw = _big_data(params)
            params |= {"store": str(store), "raw": str(raw)}
            result["big_store"] = {"path": str(store.relative_to(ROOT) if store.is_relative_to(
                                       ROOT) else store),
                                   "bytes_on_disk": _du(store), "raw_bytes": _du(raw),
                                   "prepare_seconds": round(time.perf_counter() - t0, 1)}
        for name in chosen:
            # the previous section's dirty pages (the codecs section writes about 1.3
            # GB) are written back now, untimed, not during the next section's turns
            if hasattr(os, "sync"):
                os.sync()
            sys.stderr.write(f"  datapath: {name} (load {_load()})\n")
            if name == "record_conv":
                result[name] = _run_child(name, params, env=STEADY_ALLOCATOR)
                result[name]["allocator_env"] = STEADY_ALLOCATOR
                result[name]["default_allocator"] = _run_child(name, params | {"slim": True})
            else:
                result[name] = _run_child(name, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["ratios"] = {name: {"ratio": result[name]["ratio"], "target": TARGETS[name]}
                        for name in chosen if name in TARGETS}
    return result


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv), indent=2))
