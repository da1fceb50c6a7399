"""A deterministic recording run as a real process, for the crash and concurrency tests.

``python tests/_store_script.py write STORE [options]`` records two layers of a fake
network over several epochs through :class:`topoxr.ActivationWriter`, printing one line
per finished ``write`` call (``W <k> <layer> <epoch> <batch>``) and one per finished
epoch (``E <epoch>``), flushed, so that a test can kill it at a chosen moment.  Every
value is a known function of (sample id, neuron, epoch), so any committed value can be
checked without a reference store.

``python tests/_store_script.py read STORE --until FILE`` opens the store again and
again while a writer runs and checks every committed value, until ``FILE`` exists.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

MODEL = "net"
LAYERS = ("dense", "conv")
CONV_SHAPE = (2, 3, 3)  # channels, rows, cols of the "conv" layer (reduce="none")


@dataclass(frozen=True)
class Plan:
    """The recording: sizes shared by the writer, the reader and the tests."""

    n_samples: int = 48
    n_dense: int = 6
    batch: int = 8
    epochs: int = 3
    chunk_samples: int = 16

    @property
    def sample_ids(self) -> np.ndarray:
        # stable ids that are not positions, so id/position mix-ups show
        return np.arange(self.n_samples, dtype=np.int64) * 7 + 3

    def n_neurons(self, layer: str) -> int:
        return self.n_dense if layer == "dense" else int(np.prod(CONV_SHAPE))

    @property
    def batches(self) -> list[np.ndarray]:
        ids = self.sample_ids
        return [ids[i : i + self.batch] for i in range(0, self.n_samples, self.batch)]

    @property
    def total_writes(self) -> int:
        return self.epochs * len(LAYERS) * len(self.batches)


def expected(layer: str, sample: np.ndarray, epoch: int, n_neurons: int) -> np.ndarray:
    """The value every (sample, neuron) of ``layer`` has at ``epoch``: ``(batch, neurons)``."""
    s = np.asarray(sample, dtype=np.float64)[:, None]
    n = np.arange(n_neurons, dtype=np.float64)[None, :]
    offset = 0.0 if layer == "dense" else 0.5
    return (np.sin(0.37 * s + 1.3 * n + offset) * (1.0 + 0.1 * epoch) + 0.01 * epoch).astype(
        np.float32
    )


def label_of(sample: np.ndarray) -> np.ndarray:
    return np.asarray(sample) % 3


def prediction_of(sample: np.ndarray, epoch: int) -> np.ndarray:
    return (np.asarray(sample) + epoch) % 3


def record(
    store: str,
    plan: Plan = Plan(),
    *,
    delay: float = 0.0,
    die_after: int | None = None,
    complete: str = "explicit",
    buffer_bytes: int = 0,
    flush_every: int = 5,
    expected_samples: int | None = None,
    die_in_creation: int | None = None,
    strings: bool = True,
    out=None,
) -> None:
    """Run the whole recording (resuming whatever is already in ``store``).

    With ``buffer_bytes=0`` every ``write`` commits; otherwise the writer buffers and
    ``flush()`` runs after every ``flush_every`` writes: a ``W`` line is printed only
    once its write is committed (after its flush, epoch completion or scalar logging).
    ``die_in_creation=k``: the process kills itself (SIGKILL) once the ``k``-th of the
    three steps that write new layers' files at their first commit has run (1: the
    groups, 2: their arrays; 3: the marks that they are complete). ``strings=False``
    leaves out the string metadata column ``split`` (layers of numeric columns only are
    the ones whose files are written at their first commit).
    """
    from topoxr import ActivationWriter

    if die_in_creation is not None:
        import topoxr.store.writer as writer_module

        steps = [0]
        run_jobs = writer_module.run_jobs  # used by the writer for layer creation only

        def run_then_die(jobs):
            run_jobs(jobs)
            steps[0] += 1
            if steps[0] >= die_in_creation:
                os.kill(os.getpid(), signal.SIGKILL)

        writer_module.run_jobs = run_then_die

    unsaid: list[str] = []

    def say(line: str) -> None:
        if out is not None:
            out.write(line + "\n")
            out.flush()

    def committed() -> None:
        while unsaid:
            say(unsaid.pop(0))

    k = 0
    with ActivationWriter(store, model=MODEL, chunk_samples=plan.chunk_samples,
                          attrs={"framework": "script"}, buffer_bytes=buffer_bytes,
                          expected_samples=expected_samples) as writer:
        for epoch in range(plan.epochs):
            for b, ids in enumerate(plan.batches):
                for layer in LAYERS:
                    n = plan.n_neurons(layer)
                    values = expected(layer, ids, epoch, n)
                    kwargs = {}
                    if layer == "conv":
                        values = values.reshape(len(ids), *CONV_SHAPE)
                        kwargs = {"channel_axis": 1, "reduce": "none"}
                    if strings:
                        kwargs["split"] = np.where(ids % 2 == 0, "even", "odd")
                    writer.write(layer, values, sample=ids, label=label_of(ids),
                                 prediction=prediction_of(ids, epoch), epoch=epoch,
                                 weight=ids * 0.25, **kwargs)
                    k += 1
                    unsaid.append(f"W {k} {layer} {epoch} {b}")
                    if not buffer_bytes:
                        committed()
                    elif k % flush_every == 0:
                        writer.flush()
                        committed()
                    if die_after is not None and k >= die_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if delay:
                        time.sleep(delay)
            writer.log_epoch(epoch, loss=1.0 / (epoch + 1))  # commits the buffered batches
            committed()
            if complete == "explicit":
                writer.complete_epoch(epoch)
            say(f"E {epoch}")
    say("DONE")


def check_snapshot(store: str, plan: Plan = Plan()) -> int:
    """Open ``store`` once and check it; return the number of committed values seen.

    Raises AssertionError on a torn batch or a committed value that is not the expected one.
    """
    from topoxr import open_store

    tree = open_store(store)
    seen = 0
    for layer in LAYERS:
        if MODEL not in tree.children or layer not in tree[MODEL].children:
            continue
        ds = tree[MODEL][layer].to_dataset()
        committed = ds.committed.values
        act = ds.activation.values  # uncommitted values are NaN
        ids = ds.sample.values
        for e, epoch in enumerate(ds.epoch.values.tolist()):
            want = expected(layer, ids, epoch, plan.n_neurons(layer)).T
            ok = committed[:, e]
            assert np.array_equal(act[:, ok, e], want[:, ok]), (layer, epoch, "values")
            assert np.isnan(act[:, ~ok, e]).all(), (layer, epoch, "uncommitted visible")
            # all-or-nothing per batch (batches are consecutive probe positions)
            pos = {int(s): i for i, s in enumerate(ids.tolist())}
            for batch in plan.batches:
                where = [pos[s] for s in batch.tolist() if s in pos]
                flags = set(ok[where].tolist())
                assert len(flags) <= 1, (layer, epoch, "torn batch", batch.tolist())
            assert np.array_equal(ds.label.values, label_of(ids))
            assert np.array_equal(ds.prediction.values[ok, e], prediction_of(ids[ok], epoch))
            seen += int(ok.sum())
    return seen


def read_loop(store: str, until: str, plan: Plan = Plan()) -> int:
    """Check snapshots until ``until`` exists; print counts, exit 1 on a violation."""
    snapshots = values = 0
    while True:
        finished = os.path.exists(until)
        try:
            values += check_snapshot(store, plan)
            snapshots += 1
        except (FileNotFoundError,) as err:  # not created yet
            if finished:
                print(f"store never appeared: {err}", flush=True)
                return 1
        except Exception as err:  # noqa: BLE001 - report whatever went wrong
            if snapshots == 0 and "being created by a writer" in str(err):
                continue  # the root group is being created right now
            print(f"VIOLATION after {snapshots} snapshots: {type(err).__name__}: {err}",
                  flush=True)
            return 1
        if finished:
            break
    print(f"OK {snapshots} {values}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["write", "read"])
    parser.add_argument("store")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--complete", choices=["explicit", "close"], default="explicit")
    parser.add_argument("--until", default=None)
    parser.add_argument("--buffer-bytes", type=int, default=0)
    parser.add_argument("--flush-every", type=int, default=5)
    parser.add_argument("--expected-samples", type=int, default=None)
    parser.add_argument("--die-in-creation", type=int, default=None)
    parser.add_argument("--no-strings", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "read":
        return read_loop(args.store, args.until)
    record(args.store, delay=args.delay, die_after=args.die_after, complete=args.complete,
           buffer_bytes=args.buffer_bytes, flush_every=args.flush_every,
           expected_samples=args.expected_samples, die_in_creation=args.die_in_creation,
           strings=not args.no_strings, out=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
