"""Store benchmark: the writer against plain zarr, and peak memory while writing 2 GB.

1. Throughput: the same batches written by :class:`topoxr.ActivationWriter` and by zarr
   directly into an array of the same shape, chunks and codec (zarr's default zstd),
   plus the ``sample`` coordinate, in the same process.  Measured twice: side by side,
   the two writers taking turns batch by batch (the headline ratio: total time over all
   rounds), and as separate whole runs, alternating, best of ``repeats`` (wall and CPU).
   Target: the writer within 1.2x of zarr.
3. Checksums: the same chunks written and read with zstd alone (format 1), zstd + crc32c
   (format 2, what topoxr writes) and zstd with its own checksum, side by side.
4. ``fsync=True``: the writer with and without it, whole runs alternating.
2. Peak RSS: a child process writes 2 GB (100 MB with ``quick``) batch by batch; its
   resident memory is sampled with psutil every 20 ms.  Target: under 500 MB.

Run ``python -m benchmarks store [--quick]``; scratch data goes to
``benchmarks/scratch/`` and is deleted afterwards.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._child import run_sampled

SCRATCH = Path(__file__).parent / "scratch"
MB = 1 << 20


def _batches(n_neurons: int, batch: int, pool: int = 8) -> list[np.ndarray]:
    """A few distinct batches reused cyclically (generating data is not what we time)."""
    rng = np.random.default_rng(0)
    # rounded to 1/64: about as compressible as real activations, unlike pure noise
    return [np.round(rng.normal(size=(batch, n_neurons)) * 64).astype(np.float32) / 64
            for _ in range(pool)]


class _TopoxrWriter:
    """Write the benchmark's batches with :class:`topoxr.ActivationWriter`, step by step."""

    def __init__(self, path: str, n_neurons: int, n_samples: int, epochs: int,
                 chunk_samples: int) -> None:
        from topoxr import ActivationWriter

        self.writer = ActivationWriter(path, model="bench", mode="w",
                                       chunk_samples=chunk_samples)

    def write(self, values: np.ndarray, start: int, epoch: int) -> None:
        self.writer.write("layer", values, sample=np.arange(start, start + len(values)),
                          epoch=epoch)

    def close(self) -> None:
        self.writer.close()


class _ZarrWriter:
    """Write the same activation and ``sample`` arrays with zarr alone, step by step."""

    def __init__(self, path: str, n_neurons: int, n_samples: int, epochs: int,
                 chunk_samples: int) -> None:
        import zarr

        root = zarr.open_group(path, mode="w")
        self.activation = root.create_array(
            "activation", shape=(n_neurons, n_samples, epochs),
            chunks=(n_neurons, chunk_samples, 1), dtype="float32", fill_value=np.nan,
            dimension_names=("neuron", "sample", "epoch"))
        self.sample = root.create_array("sample", shape=(n_samples,), chunks=(1 << 16,),
                                        dtype="int64", dimension_names=("sample",))

    def write(self, values: np.ndarray, start: int, epoch: int) -> None:
        self.activation[:, start:start + len(values), epoch] = values.T
        if epoch == 0:
            self.sample[start:start + len(values)] = np.arange(start, start + len(values))

    def close(self) -> None:
        pass


WRITERS = {"zarr": _ZarrWriter, "topoxr": _TopoxrWriter}


def _steps(pool: list[np.ndarray], n_samples: int, epochs: int) -> list[tuple[np.ndarray, int, int]]:
    """Every batch of a run as (values, first sample, epoch), in writing order."""
    batch = len(pool[0])
    starts = range(0, n_samples, batch)
    return [(pool[k % len(pool)], start, epoch)
            for k, (epoch, start) in enumerate((e, s) for e in range(epochs) for s in starts)]


def _write_all(kind: str, path: str, pool: list[np.ndarray], n_samples: int, epochs: int,
               chunk_samples: int) -> float:
    """Write a whole run with one writer; return wall seconds (open to close)."""
    started = time.perf_counter()
    writer = WRITERS[kind](path, pool[0].shape[1], n_samples, epochs, chunk_samples)
    for values, start, epoch in _steps(pool, n_samples, epochs):
        writer.write(values, start, epoch)
    writer.close()
    return time.perf_counter() - started


def write_with_topoxr(path: str, pool: list[np.ndarray], n_samples: int, epochs: int,
                      chunk_samples: int) -> float:
    """Write with :class:`topoxr.ActivationWriter`; return wall seconds."""
    return _write_all("topoxr", path, pool, n_samples, epochs, chunk_samples)


def write_with_zarr(path: str, pool: list[np.ndarray], n_samples: int, epochs: int,
                    chunk_samples: int) -> float:
    """Write the same activation and ``sample`` arrays with zarr; return wall seconds."""
    return _write_all("zarr", path, pool, n_samples, epochs, chunk_samples)


def interleaved(pool: list[np.ndarray], n_samples: int, epochs: int, chunk_samples: int,
                rounds: int) -> dict[str, list[float]]:
    """Both writers side by side, one batch each in turn; seconds each spent per round.

    On a shared machine the speed changes over seconds; taking turns at every step
    (opening, each batch, closing; who goes first alternates) exposes both writers to
    the same conditions, so their ratio is much steadier than that of separate runs.
    """
    spent: dict[str, list[float]] = {kind: [] for kind in WRITERS}
    for _ in range(rounds):
        total = dict.fromkeys(WRITERS, 0.0)
        writers: dict[str, Any] = {}
        for kind, cls in WRITERS.items():
            started = time.perf_counter()
            writers[kind] = cls(str(SCRATCH / f"il-{kind}.zarr"), pool[0].shape[1],
                                n_samples, epochs, chunk_samples)
            total[kind] += time.perf_counter() - started
        order = list(WRITERS)
        for values, start, epoch in _steps(pool, n_samples, epochs):
            order.reverse()
            for kind in order:
                started = time.perf_counter()
                writers[kind].write(values, start, epoch)
                total[kind] += time.perf_counter() - started
        for kind in order:
            started = time.perf_counter()
            writers[kind].close()
            total[kind] += time.perf_counter() - started
            shutil.rmtree(SCRATCH / f"il-{kind}.zarr", ignore_errors=True)
        for kind in WRITERS:
            spent[kind].append(total[kind])
    return spent


_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from benchmarks.bench_store import _batches, write_with_topoxr
import psutil
pool = _batches({n_neurons}, {batch})
rss_before = psutil.Process().memory_info().rss
seconds = write_with_topoxr({path!r}, pool, {n_samples}, {epochs}, {chunk})
print(json.dumps({{"seconds": seconds, "rss_after_imports": rss_before}}))
"""


def peak_rss_of_writing(total_bytes: int, n_neurons: int, batch: int, chunk: int) -> dict:
    """Write ``total_bytes`` in a child process and sample its RSS."""
    n_samples = 16384
    epochs = max(1, round(total_bytes / (n_neurons * n_samples * 4)))
    path = str(SCRATCH / "rss.zarr")
    code = _CHILD.format(root=str(Path(__file__).parent.parent), n_neurons=n_neurons,
                         batch=batch, path=path, n_samples=n_samples, epochs=epochs, chunk=chunk)
    info, peak = run_sampled(code)
    written = n_neurons * n_samples * epochs * 4
    on_disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)
    return {
        "bytes_written": written,
        "bytes_on_disk": on_disk,
        "neurons": n_neurons, "samples": n_samples, "epochs": epochs, "batch": batch,
        "seconds": round(info["seconds"], 2),
        "throughput_mb_s": round(written / MB / info["seconds"], 1),
        "peak_rss_mb": round(peak / MB, 1),
        "rss_after_imports_mb": round(info["rss_after_imports"] / MB, 1),
        "target_peak_rss_mb": 500,
        "meets_target": peak < 500 * MB,
    }


def throughput(n_neurons: int, batch: int, chunk: int, n_samples: int, epochs: int,
               repeats: int) -> dict:
    """Both writers measured two ways, ``repeats`` rounds each.

    Separate runs (one whole run per writer, alternating, best of ``repeats``, wall and
    CPU time), and :func:`interleaved` (the headline: total seconds over all rounds).
    """
    pool = _batches(n_neurons, batch)
    times: dict[str, list[float]] = {"topoxr": [], "zarr": []}
    cpu: dict[str, list[float]] = {"topoxr": [], "zarr": []}
    for _ in range(repeats):
        for name, func in (("zarr", write_with_zarr), ("topoxr", write_with_topoxr)):
            path = str(SCRATCH / f"tp-{name}.zarr")
            cpu0 = time.process_time()
            times[name].append(func(path, pool, n_samples, epochs, chunk))
            cpu[name].append(time.process_time() - cpu0)
            shutil.rmtree(path, ignore_errors=True)
    side_by_side = interleaved(pool, n_samples, epochs, chunk, repeats)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    size = n_neurons * n_samples * epochs * 4
    ratio = sum(side_by_side["topoxr"]) / sum(side_by_side["zarr"])
    return {
        "bytes": size, "neurons": n_neurons, "samples": n_samples, "epochs": epochs,
        "batch": batch, "chunk_samples": chunk, "repeats": repeats,
        "interleaved": {
            "zarr_seconds": [round(t, 3) for t in side_by_side["zarr"]],
            "topoxr_seconds": [round(t, 3) for t in side_by_side["topoxr"]],
            "ratio_of_rounds": [round(t / z, 3) for t, z in
                                zip(side_by_side["topoxr"], side_by_side["zarr"], strict=True)],
            "zarr_mb_s": round(size * repeats / MB / sum(side_by_side["zarr"]), 1),
            "topoxr_mb_s": round(size * repeats / MB / sum(side_by_side["topoxr"]), 1),
            "ratio_topoxr_over_zarr": round(ratio, 3),
        },
        "separate_runs": {
            "zarr_seconds": [round(t, 3) for t in times["zarr"]],
            "topoxr_seconds": [round(t, 3) for t in times["topoxr"]],
            "zarr_cpu_seconds": [round(t, 3) for t in cpu["zarr"]],
            "topoxr_cpu_seconds": [round(t, 3) for t in cpu["topoxr"]],
            "zarr_mb_s": round(size / MB / best["zarr"], 1),
            "topoxr_mb_s": round(size / MB / best["topoxr"], 1),
            "ratio_topoxr_over_zarr": round(best["topoxr"] / best["zarr"], 3),
            "cpu_ratio_topoxr_over_zarr": round(best_cpu["topoxr"] / best_cpu["zarr"], 3),
            "median_ratio_of_rounds": round(
                float(np.median(np.divide(times["topoxr"], times["zarr"]))), 3),
        },
        "ratio_topoxr_over_zarr": round(ratio, 3),
        "target_ratio": 1.2,
        "meets_target": ratio <= 1.2,
    }


#: The codec chains compared by :func:`checksum_cost` (compressors after ``bytes``)
CODECS = {
    "zstd (unchecked, format 1)": lambda c: (c.ZstdCodec(level=0, checksum=False),),
    "zstd + crc32c (topoxr, format 2)": lambda c: (c.ZstdCodec(level=0, checksum=False),
                                                   c.Crc32cCodec()),
    "zstd with its own checksum": lambda c: (c.ZstdCodec(level=0, checksum=True),),
}


def checksum_cost(n_neurons: int, batch: int, chunk: int, n_samples: int, epochs: int,
                  rounds: int) -> dict:
    """Write and read the same chunks with each codec chain of :data:`CODECS`, side by side.

    Batch by batch the three arrays take turns (as :func:`interleaved`), so the ratios
    compare them under the same machine conditions; then they are read back chunk by
    chunk, again taking turns.
    """
    import zarr
    from zarr import codecs

    pool = _batches(n_neurons, batch)
    write = dict.fromkeys(CODECS, 0.0)
    read = dict.fromkeys(CODECS, 0.0)
    for r in range(rounds):
        arrays = {}
        for i, (name, chain) in enumerate(CODECS.items()):
            root = zarr.open_group(str(SCRATCH / f"ck-{i}.zarr"), mode="w")
            arrays[name] = root.create_array(
                "activation", shape=(n_neurons, n_samples, epochs),
                chunks=(n_neurons, chunk, 1), dtype="float32", fill_value=np.nan,
                compressors=chain(codecs))
        order = list(CODECS)
        for values, start, epoch in _steps(pool, n_samples, epochs):
            order.reverse()
            for name in order:
                started = time.perf_counter()
                arrays[name][:, start:start + len(values), epoch] = values.T
                write[name] += time.perf_counter() - started
        for epoch in range(epochs):  # read back chunk by chunk, the arrays taking turns
            for start in range(0, n_samples, chunk):
                order.reverse()
                for name in order:
                    started = time.perf_counter()
                    np.asarray(arrays[name][:, start:start + chunk, epoch])
                    read[name] += time.perf_counter() - started
        for i in range(len(CODECS)):
            shutil.rmtree(SCRATCH / f"ck-{i}.zarr", ignore_errors=True)
    size = n_neurons * n_samples * epochs * 4 * rounds
    base = next(iter(CODECS))
    return {
        "bytes_per_round": size // rounds, "rounds": rounds, "neurons": n_neurons,
        "batch": batch, "chunk_samples": chunk,
        "write_mb_s": {k: round(size / MB / v, 1) for k, v in write.items()},
        "read_mb_s": {k: round(size / MB / v, 1) for k, v in read.items()},
        "write_ratio_over_unchecked": {k: round(v / write[base], 3) for k, v in write.items()},
        "read_ratio_over_unchecked": {k: round(v / read[base], 3) for k, v in read.items()},
    }


def fsync_cost(n_neurons: int, batch: int, chunk: int, n_samples: int, epochs: int,
               rounds: int) -> dict:
    """The writer with and without ``fsync=True``: whole runs, alternating."""
    from topoxr import ActivationWriter

    pool = _batches(n_neurons, batch)
    spent = {False: 0.0, True: 0.0}
    for r in range(rounds):
        for fsync in ((False, True) if r % 2 == 0 else (True, False)):
            path = SCRATCH / f"fs-{fsync}.zarr"
            started = time.perf_counter()
            with ActivationWriter(str(path), model="bench", mode="w", chunk_samples=chunk,
                                  fsync=fsync) as writer:
                for values, start, epoch in _steps(pool, n_samples, epochs):
                    writer.write("layer", values, sample=np.arange(start, start + len(values)),
                                 epoch=epoch)
            spent[fsync] += time.perf_counter() - started
            shutil.rmtree(path, ignore_errors=True)
    size = n_neurons * n_samples * epochs * 4 * rounds
    return {"bytes_per_round": size // rounds, "rounds": rounds, "batch": batch,
            "mb_s": {"default": round(size / MB / spent[False], 1),
                     "fsync=True": round(size / MB / spent[True], 1)},
            "ratio_fsync_over_default": round(spent[True] / spent[False], 3)}


def main(quick: bool = False) -> dict:
    """Run both measurements; ``quick`` writes ~100 MB instead of 2 GB."""
    SCRATCH.mkdir(exist_ok=True)
    n_neurons, batch, chunk = 512, 256, 512  # 512 KiB batches, 1 MiB chunks
    try:
        result = {
            "throughput": throughput(n_neurons, batch, chunk, n_samples=4096,
                                     epochs=4 if quick else 16, repeats=3 if quick else 5),
            "peak_rss": peak_rss_of_writing((100 if quick else 2048) * MB, n_neurons, batch,
                                            chunk),
        }
        result["checksums"] = checksum_cost(n_neurons, batch, chunk, n_samples=4096,
                                            epochs=4 if quick else 16,
                                            rounds=3 if quick else 5)
        result["fsync"] = fsync_cost(n_neurons, batch, chunk, n_samples=4096,
                                     epochs=2 if quick else 4, rounds=2 if quick else 3)
        if not quick:  # larger batches: the writer's per-batch cost weighs less
            result["throughput_batch_1024"] = throughput(
                n_neurons, 1024, 1024, n_samples=4096, epochs=16, repeats=5)
            # inference only: one long epoch, every batch adds samples
            result["throughput_one_epoch"] = throughput(
                n_neurons, batch, chunk, n_samples=65536, epochs=1, repeats=5)
    finally:
        for leftover in SCRATCH.glob("*.zarr"):
            shutil.rmtree(leftover, ignore_errors=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv), indent=2))
