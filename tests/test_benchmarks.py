"""The data-path benchmark's harness, run end to end at tiny sizes.

``make bench`` is not part of CI; this keeps its harness working as the library
changes: every section runs in its own child process on a real store on disk, each
checks that topoxr and its baseline computed the same thing (the harness raises
otherwise), and every ratio of issue 13's targets comes back. No timing is asserted.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

from benchmarks import bench_datapath  # noqa: E402

TINY = {"write_samples": 512, "read_samples": 2048, "read_epochs": 2, "codec_samples": 512,
        "mlp_samples": 512, "conv_samples": 64, "mlp_repeats": 1, "conv_repeats": 1}


def _positive_seconds(section: dict) -> None:
    assert section["seconds"], section
    for name, seconds in section["seconds"].items():
        assert math.isfinite(seconds) and seconds > 0, (name, seconds)


@pytest.mark.slow
def test_every_datapath_section_runs_and_checks_its_baseline(tmp_path):
    result = bench_datapath.main(quick=True, sizes=TINY, scratch=tmp_path)
    assert result["sizes"] == TINY
    for name in bench_datapath.SECTIONS:
        assert name in result, name
    # each target section's ratio is a real measurement of both sides
    assert set(result["ratios"]) == set(bench_datapath.TARGETS)
    for name, entry in result["ratios"].items():
        assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0, (name, entry)
        assert entry["target"] == bench_datapath.TARGETS[name]
    for name in ("write", "read", "naps"):
        _positive_seconds(result[name])
    write = result["write"]
    assert write["bytes"] == 4 * bench_datapath.NEURONS * TINY["write_samples"] * (
        bench_datapath.WRITE_EPOCHS)
    assert write["bytes_on_disk"]["topoxr"] > write["bytes"]  # uncompressed, plus coords
    assert result["read"]["bytes"] == 4 * bench_datapath.NEURONS * TINY["read_samples"] * (
        TINY["read_epochs"])
    # what the MLP's recording and its hand-written baseline asked of the file system:
    # the recording's layers share their per-sample files (hard links), so it has more
    # file names than inodes; the baseline's are plain files
    mlp = result["record_mlp"]
    entries = mlp["entries"]
    assert entries["record"]["file_names"] > entries["record"]["file_inodes"] > 0
    assert entries["direct"]["file_names"] == entries["direct"]["file_inodes"] > 0
    assert entries["record"]["folders"] > entries["direct"]["folders"] > 1
    assert set(mlp["inode_create_us"]) == {"section_start", "section_end"}
    assert min(mlp["inode_create_us"].values()) > 0
    conv = result["record_conv"]
    assert sorted(int(n) for n in conv["by_samples"]) == [TINY["conv_samples"],
                                                         4 * TINY["conv_samples"]]
    _positive_seconds(conv)
    assert set(conv["seconds"]) >= {"forward", "record", "capture_pooled", "record_new_path",
                                    "record_later_epoch"}
    assert math.isfinite(conv["ratio_capture_pooled"]) and conv["ratio_capture_pooled"] > 0
    # every timed turn's process CPU seconds, [user, system], one pair per turn
    small = conv["by_samples"][str(TINY["conv_samples"])]  # JSON from the child: str keys
    cpu = small["turn_cpu_user_system_seconds"]
    for name, turns in small["turn_seconds"].items():
        assert len(cpu[name]) == len(turns), name
        assert all(len(pair) == 2 and min(pair) >= 0 for pair in cpu[name]), (name, cpu[name])
    # the parts of a run, from timestamps of the model's calls, add up to the whole run:
    # one batch per CONV_BATCH samples inside the model, and a recording's store does
    # work after the last batch (its last commit), which the bare forward pass does not
    batches = -(-TINY["conv_samples"] // bench_datapath.CONV_BATCH)
    for name, parts in conv["parts"].items():
        assert parts["batches"] == batches, (name, parts)
        summed = sum(parts[k] for k in ("before_first", "in_model", "after_first_batch",
                                        "between_later_batches", "after_last"))
        assert parts["in_model"] > 0 and min(parts.values()) >= 0, (name, parts)
        assert summed == pytest.approx(parts["total"], rel=0.05, abs=2e-4), (name, parts)
    assert conv["parts"]["record"]["after_last"] > conv["parts"]["forward"]["after_last"]
    assert conv["default_allocator"]["samples"] == TINY["conv_samples"]
    assert conv["bytes_on_disk"] > 0
    # the section's own scratch folder is removed; the cached read/NAPs store is kept
    kept = [p.name for p in tmp_path.iterdir()]
    assert len(kept) == 1 and kept[0].startswith(
        f"datapath-{bench_datapath.NEURONS}x{TINY['read_samples']}x{TINY['read_epochs']}-")


def test_datapath_refuses_unknown_sizes_and_sections(tmp_path):
    with pytest.raises(ValueError, match="unknown sizes.*write_sample"):
        bench_datapath.main(quick=True, sizes={"write_sample": 8}, scratch=tmp_path)
    with pytest.raises(ValueError, match="unknown sections.*'recording'"):
        bench_datapath.main(quick=True, sections=("recording",), scratch=tmp_path)
    assert list(tmp_path.iterdir()) == []
