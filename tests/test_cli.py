"""The ``topoxr`` command line: exit codes, one-line errors, info output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import requires_holoviews, requires_panel
from topoxr import ActivationWriter
from topoxr.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "topoxr.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def small_store(store_path):
    with ActivationWriter(store_path, model="net", attrs={"framework": "numpy"}) as writer:
        for epoch in range(2):
            writer.write("dense.0", np.arange(24, dtype=float).reshape(4, 6) + epoch,
                         sample=np.arange(4), label=[0, 1, 0, 1], epoch=epoch)
        writer.write("dense.0", np.ones((4, 6)), sample=np.arange(4), label=[0, 1, 0, 1], epoch=2)
    # epoch 3 left incomplete: only half the probe set
    with ActivationWriter(store_path, model="net") as writer:
        writer.write("dense.0", np.ones((2, 6)), sample=np.arange(2), label=[0, 1], epoch=3)
    return store_path


def test_info_json_reports_layers_and_incomplete_epochs(small_store):
    result = run_cli("info", small_store, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    layer = info["models"]["net"]["layers"]["dense.0"]
    assert layer["neurons"] == 6
    assert layer["samples"] == 4
    assert layer["epochs"] == [0, 1, 2, 3]
    assert layer["complete_epochs"] == [0, 1, 2]
    assert layer["incomplete_epochs"] == [3]
    assert info["models"]["net"]["attrs"]["framework"] == "numpy"


def test_info_text_names_model_layer_and_incomplete_epoch(small_store):
    result = run_cli("info", small_store)
    assert result.returncode == 0
    assert "model net" in result.stdout
    assert "dense.0" in result.stdout
    assert "incomplete: [3]" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["info", "/definitely/not/here.zarr"], 1, "no topoxr store"),
        (["info"], 2, "required"),
        (["nonsense-command"], 2, "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_codes(args, code, needle):
    result = run_cli(*args)
    assert result.returncode == code
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_info_on_a_folder_that_is_not_a_store(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "file.txt").write_text("hello")
    assert main(["info", str(tmp_path / "stuff")]) == 1
    err = capsys.readouterr().err
    assert "not a topoxr store" in err
    assert (tmp_path / "stuff" / "file.txt").read_text() == "hello"


@pytest.mark.parametrize("command", ["info", "verify", "demo", "naps", "layout", "render", "compare",
                                     "serve"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: topoxr {command}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# naps / layout / render / compare / serve on a store written with numpy
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """Two models, 24 neurons with planted class selectivity, 3 epochs, predictions."""
    from topoxr.testing import make_activations

    path = str(tmp_path_factory.mktemp("cli") / "planted.zarr")
    for model, seed in [("net_a", 0), ("net_b", 1)]:
        ds = make_activations(n_neurons=24, n_samples=60, n_epochs=3, n_labels=4,
                              random_state=seed)
        act = ds["activation"] if hasattr(ds, "data_vars") else ds
        act = act.transpose("neuron", "sample", "epoch")
        labels = act["label"].values
        with ActivationWriter(path, model=model) as writer:
            for e, epoch in enumerate(act["epoch"].values):
                pred = labels.copy()
                pred[: 4 + e] = (pred[: 4 + e] + 1) % 4  # a few wrong predictions
                writer.write("hidden", act.isel(epoch=e).values.T, sample=act["sample"].values,
                             label=labels, prediction=pred, epoch=int(epoch))
    return path


def test_naps_prints_groups_and_writes_csv(planted_store, tmp_path, capsys):
    assert main(["naps", planted_store, "--model", "net_a", "--by", "label,correct"]) == 0
    assert "net_a/hidden: 24 neurons" in capsys.readouterr().out
    out = tmp_path / "naps.csv"
    assert main(["naps", planted_store, "--out", str(out)]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    assert set(table["model"]) == {"net_a", "net_b"}
    assert {"neuron", "label", "epoch", "nap", "count"} <= set(table.columns)
    # normalised NAPs: per neuron, epoch and model, the mean over labels is zero
    means = table.groupby(["model", "neuron", "epoch"])["nap"].mean()
    assert np.allclose(means, 0, atol=1e-5)


def test_layout_saves_into_the_store_and_render_uses_it(planted_store, tmp_path, capsys):
    pytest.importorskip("holoviews")
    from topoxr import open_store

    assert main(["layout", planted_store, "--model", "net_a", "--method", "pca",
                 "--name", "clipca", "--no-progress"]) == 0
    assert "trustworthiness" in capsys.readouterr().out
    node = open_store(planted_store)["net_a/hidden"]
    saved = node["layouts/clipca"]
    x = saved.to_dataset()["x"].values
    assert x.shape == (24,) and np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
    html = tmp_path / "maps.html"
    assert main(["render", planted_store, "--model", "net_a", "--layout", "clipca",
                 "--out", str(html)]) == 0
    text = html.read_text()
    assert "net_a / hidden" in text and "<script" in text
    png = tmp_path / "maps.png"
    assert main(["render", planted_store, "--model", "net_b", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_writes_a_side_by_side_report(planted_store, tmp_path):
    pytest.importorskip("holoviews")
    out = tmp_path / "compare.html"
    assert main(["compare", planted_store, "--models", "net_a", "net_b", "--layer", "hidden",
                 "--out", str(out)]) == 0
    html = out.read_text()
    assert "net_a/hidden vs net_b/hidden" in html
    # the alignment's note (rotation, matched neurons, RMSD) is in the section's text
    assert '"rmsd"' in html.replace("&quot;", '"') and '"n_matched"' in html.replace("&quot;", '"')


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["naps", "{store}", "--layer", "nope"], "no layer matches"),
        (["naps", "{store}", "--by", "nope"], "nope"),
        (["layout", "{store}", "--method", "nope", "--no-progress"], "registered methods"),
        (["layout", "{store}", "--epoch", "99", "--no-progress"], "epoch 99 is not recorded"),
        pytest.param(["render", "{store}", "--layout", "missing", "--out", "{tmp}/x.html"],
                     "no layout", marks=requires_holoviews),
        (["render", "{store}", "--out", "{tmp}/x.pdf"], ".html, .png or .gif"),
        pytest.param(["serve", "{tmp}/absent.zarr"], "no topoxr store", marks=requires_panel),
    ],
)
def test_analysis_user_errors_are_one_line(planted_store, tmp_path, capsys, args, needle):
    args = [a.format(store=planted_store, tmp=tmp_path) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("topoxr ")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------
# verify, damaged stores, output paths, ports (issue 12)
# --------------------------------------------------------------------------------------
def test_verify_passes_a_sound_store_and_info_says_so(small_store):
    assert "never verified" in run_cli("info", small_store).stdout
    result = run_cli("verify", small_store, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok")
    assert "verified" in run_cli("info", small_store).stdout
    report = json.loads(run_cli("verify", small_store, "--json").stdout)
    assert report["ok"] and report["layers"] == 1 and report["chunks_read"] > 5


def test_verify_names_a_damaged_chunk_and_exits_1(small_store):
    from pathlib import Path

    chunk = Path(small_store) / "net" / "dense.0" / "activation" / "c.0.0.1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = run_cli("verify", small_store, "--no-progress")
    assert result.returncode == 1
    line = result.stdout.splitlines()[0]
    assert "array 'activation', chunk c.0.0.1" in line and "crc32c" in line
    assert "samples [0, 1, 2, 3], epochs [1]" in line
    problems = json.loads(run_cli("verify", small_store, "--json").stdout)["problems"]
    assert len(problems) == 1 and problems[0]["kind"] == "damaged"


def test_damaged_metadata_is_one_line_naming_the_file(small_store):
    from pathlib import Path

    meta = Path(small_store) / "net" / "dense.0" / "activation" / "zarr.json"
    meta.write_text(meta.read_text().replace('"float32"', '"int16"'))
    for command in (["info"], ["naps"], ["verify", "--no-progress"]):
        result = run_cli(command[0], small_store, *command[1:])
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "net/dense.0/activation/zarr.json is damaged" in result.stdout + result.stderr


def test_out_folders_are_created_by_every_subcommand_and_failures_are_one_line(
        small_store, tmp_path):
    out = tmp_path / "new" / "deeper" / "naps.csv"
    result = run_cli("naps", small_store, "--out", str(out))
    assert result.returncode == 0 and out.exists(), result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("naps", small_store, "--out", str(blocker / "sub" / "x.csv"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot create the folder" in result.stderr


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_serve_refuses_ports_out_of_range(small_store, port):
    result = run_cli("serve", small_store, "--port", port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--port" in result.stderr


# --------------------------------------------------------------------------------------
# arguments checked before anything is written (audit of the command line)
# --------------------------------------------------------------------------------------
def _files(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that nothing changed)."""
    from pathlib import Path

    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def planted_copy(planted_store, tmp_path):
    """A copy of the planted store, for the commands that could change it."""
    import shutil

    path = tmp_path / "copy.zarr"
    shutil.copytree(planted_store, path)
    return str(path)


def test_compare_refuses_an_out_that_is_not_html_or_lies_in_a_store(planted_copy, tmp_path,
                                                                      capsys):
    before = _files(planted_copy)
    png = tmp_path / "cmp.png"
    layer_meta = f"{planted_copy}/net_a/hidden/zarr.json"
    inside = f"{planted_copy}/net_a/report.html"
    for out, needle in ((png, ".html"), (layer_meta, ".html"), (inside, "Zarr store")):
        assert main(["compare", planted_copy, "--models", "net_a", "net_b",
                     "--layer", "hidden", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert not png.exists()
    assert _files(planted_copy) == before  # the layer's metadata untouched, nothing added
    assert run_cli("verify", planted_copy, "--no-progress").returncode == 0


def test_compare_refuses_more_than_two_layers_as_a_usage_error(planted_copy, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    with pytest.raises(SystemExit) as exit_:
        main(["compare", planted_copy, "--models", "net_a", "net_b",
              "--layer", "hidden", "hidden", "hidden", "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: topoxr compare" in err and "--layer" in err and "3" in err, err
    assert not out.exists()


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_render_refuses_several_layers_for_a_png_or_gif(planted_store, tmp_path, capsys,
                                                        suffix):
    out = tmp_path / f"maps.{suffix}"
    with pytest.raises(SystemExit) as exit_:
        main(["render", planted_store, "--out", str(out), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "net_a/hidden" in err and "net_b/hidden" in err and f".{suffix}" in err, err
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("k", ["0", "-3"])
def test_layout_refuses_k_below_one_before_saving(planted_copy, capsys, k):
    before = _files(planted_copy)
    with pytest.raises(SystemExit) as exit_:
        main(["layout", planted_copy, "--model", "net_a", "--method", "pca", "--k", k,
              "--no-progress"])
    assert exit_.value.code == 2
    assert "--k" in capsys.readouterr().err
    assert _files(planted_copy) == before


def test_layout_prints_the_k_it_used(planted_copy, capsys):
    from topoxr import open_store
    from topoxr.grouping import naps
    from topoxr.layouts import load_layout
    from topoxr.metrics import quality

    assert main(["layout", planted_copy, "--model", "net_a", "--method", "pca", "--k", "50",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    nap = naps(open_store(planted_copy)["net_a/hidden"].to_dataset()).compute()
    laid = load_layout(planted_copy, "net_a", "hidden", "pca", onto=nap)
    score = quality(laid.isel(epoch=[-1]), k=50)
    used = score.attrs["k"]
    assert used < 50  # 24 neurons: fewer neighbours than asked for
    assert (f"trustworthiness {float(score['trustworthiness'].values[0]):.3f} (k={used})"
            in out), out


def test_a_failing_layout_saves_nothing_and_names_the_layer(tmp_path, capsys):
    import json as json_

    path = str(tmp_path / "two.zarr")
    rng = np.random.default_rng(0)
    with ActivationWriter(path, model="net") as writer:
        for epoch in range(2):
            labels = np.arange(20) % 4
            writer.write("first", rng.normal(size=(20, 8)), sample=np.arange(20), label=labels,
                         epoch=epoch)
            writer.write("second", rng.normal(size=(20, 3)), sample=np.arange(20),
                         label=labels, epoch=epoch)
    assert main(["layout", path, "--layer", "first", "--method", "pca", "--name", "main",
                 "--no-progress"]) == 0
    capsys.readouterr()
    before = _files(path)
    assert main(["layout", path, "--method", "random", "--name", "main", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "net/second" in err and "net/first" not in err, err
    assert _files(path) == before  # the saved 'main' layout of net/first is untouched
    meta = json_.loads((tmp_path / "two.zarr/net/first/layouts/main/zarr.json").read_text())
    assert json_.loads(meta["attributes"]["topoxr_layout"])["method"] == "pca"


def test_layers_and_models_are_selected_by_the_names_info_prints(tmp_path, capsys):
    path = str(tmp_path / "names.zarr")
    with ActivationWriter(path, model="my net") as writer:
        writer.write("out layer", np.arange(24, dtype=float).reshape(4, 6),
                     sample=np.arange(4), label=[0, 1, 0, 1], epoch=0)
    assert main(["info", path]) == 0
    info = capsys.readouterr().out
    assert "model my net" in info and "layer out layer" in info
    for model, layer in (("my net", "out layer"), ("my_net", "out_layer")):
        assert main(["naps", path, "--model", model, "--layer", layer]) == 0
        assert capsys.readouterr().out.startswith("my_net/out_layer: 6 neurons")


def test_the_last_epoch_is_the_highest_whatever_the_order_epochs_were_recorded_in(tmp_path):
    """Epochs recorded as 0, 9, 3: `topoxr layout --epoch last` (the default) shared the
    layout of epoch 3, the last written, and `info` printed the span 0..3."""
    from topoxr.layouts import load_layout

    path = str(tmp_path / "order.zarr")
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    with ActivationWriter(path, model="m") as writer:
        for epoch in (0, 9, 3):
            writer.write("dense", rng.normal(size=(30, 8)), sample=np.arange(30),
                         label=labels, epoch=epoch)
    assert main(["layout", path, "--method", "pca", "--no-progress"]) == 0
    laid = load_layout(path, "m", "dense", "pca")
    assert json.loads(laid.attrs["topoxr_layout"])["share"] == 9
    assert "3 epochs (0..9)" in run_cli("info", path).stdout


def _epochs_store(path: str, incomplete: bool = True, labels: bool = True) -> str:
    """Epochs 0-2 of 40 samples each and (``incomplete``) an epoch 3 of 8 noisy ones."""
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    centres = rng.normal(size=(4, 12)) * 3
    with ActivationWriter(path, model="m") as writer:
        for epoch in range(3):
            values = centres[y] * (1 + epoch) + rng.normal(size=(40, 12))
            extra = {"label": y} if labels else {"prediction": y}
            writer.write("h", values, sample=np.arange(40), epoch=epoch, **extra)
            writer.complete_epoch(epoch)
        if incomplete:
            extra = {"label": y[:8]} if labels else {"prediction": y[:8]}
            writer.write("h", rng.normal(size=(8, 12)) * 50, sample=np.arange(8), epoch=3,
                         **extra)
    return path


def test_layout_prints_the_quality_of_the_epoch_it_laid_out(tmp_path, capsys):
    """`layout --epoch 2` printed the trustworthiness of the last epoch's NAPs on that
    layout, not of epoch 2's."""
    from topoxr import naps, quality
    from topoxr.layouts import load_layout

    path = _epochs_store(str(tmp_path / "s.zarr"), incomplete=False)
    assert main(["layout", path, "--method", "pca", "--epoch", "0", "--k", "4",
                 "--no-progress"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    laid = load_layout(path, "m", "h", "pca", onto=naps(topoxr_open(path)["m/h"]))
    expected = quality(laid.sel(epoch=[0]), k=4)
    assert f"at epoch 0, trustworthiness {float(expected['trustworthiness'][0]):.3f}" in line


def topoxr_open(path):
    from topoxr import open_store

    return open_store(path)


def test_last_is_the_last_complete_epoch_and_an_incomplete_one_is_named(tmp_path, capsys):
    """The default --epoch last laid out (and render drew) epoch 3, of 8 samples of
    noise, without a word."""
    from topoxr.layouts import load_layout

    path = _epochs_store(str(tmp_path / "s.zarr"))
    assert main(["layout", path, "--method", "pca", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "epoch 3 is incomplete; using epoch 2, the last complete one" in captured.err
    assert "at epoch 2," in captured.out
    assert json.loads(load_layout(path, "m", "h", "pca").attrs["topoxr_layout"])["share"] == 2
    assert main(["layout", path, "--method", "pca", "--name", "e3", "--epoch", "3",
                 "--no-progress"]) == 0  # asked for: taken
    assert json.loads(load_layout(path, "m", "h", "e3").attrs["topoxr_layout"])["share"] == 3


@requires_holoviews
def test_render_draws_the_last_complete_epoch_and_lays_out_unlabelled_layers(tmp_path, capsys):
    png = tmp_path / "maps.png"
    path = _epochs_store(str(tmp_path / "s.zarr"))
    assert main(["render", path, "--out", str(png)]) == 0
    assert "using epoch 2" in capsys.readouterr().err
    # a layer with predictions only: render by prediction (needed labels before)
    bare = _epochs_store(str(tmp_path / "p.zarr"), incomplete=False, labels=False)
    assert main(["render", bare, "--by", "prediction", "--out", str(png)]) == 0, \
        capsys.readouterr().err


def test_a_model_or_layer_that_matches_nothing_is_refused_beside_one_that_does(
        planted_store, capsys):
    assert main(["naps", planted_store, "--layer", "hidden", "--layer", "typo"]) == 1
    assert "--layer 'typo' matches nothing" in capsys.readouterr().err
    assert main(["naps", planted_store, "--model", "net_a", "--model", "net_c"]) == 1
    assert "--model 'net_c' matches nothing" in capsys.readouterr().err


def test_info_exits_1_when_the_recorded_verification_found_problems(small_store):
    from pathlib import Path

    chunk = Path(small_store) / "net" / "dense.0" / "activation" / "c.0.0.1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert run_cli("verify", small_store, "--no-progress").returncode == 1
    result = run_cli("info", small_store)
    assert "1 problem(s)" in result.stdout and result.returncode == 1


@requires_holoviews
def test_compare_names_the_layer_that_failed(planted_store, tmp_path, capsys):
    path = _epochs_store(str(tmp_path / "s.zarr"), incomplete=False)
    with ActivationWriter(path, model="tiny") as writer:
        writer.write("h", np.random.default_rng(0).normal(size=(40, 4)), sample=np.arange(40),
                     label=np.arange(40) % 4, epoch=0)
    assert main(["compare", path, "--models", "m", "tiny", "--layer", "h",
                 "--out", str(tmp_path / "new" / "c.html")]) == 1
    assert "tiny/h: a layout needs at least 5 neurons" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # a failed command leaves no folder behind


@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "argument --seed: a seed is an integer from 0"),
    (["--name", ""], "--name must not be empty"),
])
def test_layout_options_without_meaning_are_usage_errors(planted_copy, capsys, args, needle):
    before = _files(planted_copy)
    with pytest.raises(SystemExit) as exit_:
        main(["layout", planted_copy, "--method", "pca", "--no-progress", *args])
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err
    assert _files(planted_copy) == before


def test_out_through_a_link_into_a_store_is_refused(planted_copy, tmp_path, capsys):
    import os

    link = tmp_path / "link"
    os.symlink(os.path.join(planted_copy, "net_a"), link)
    assert main(["naps", planted_copy, "--out", str(link / ".." / "escaped.csv")]) == 1
    assert "inside the Zarr store" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(planted_copy, "escaped.csv"))


def test_a_damaged_saved_layout_stops_no_command_and_layout_saves_it_again(tmp_path, capsys):
    """A changed byte in one saved layout made every command fail on every layer, and
    `topoxr layout --name` (the repair) failed too."""
    from pathlib import Path

    from topoxr import open_store, verify
    from topoxr.layouts import load_layout

    path = _epochs_store(str(tmp_path / "s.zarr"), incomplete=False)
    assert main(["layout", path, "--method", "pca", "--name", "ep", "--no-progress"]) == 0
    chunk = Path(path) / "m" / "h" / "layouts" / "ep" / "x" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"saved beside the recording.*save it again"):
        open_store(path)  # still loud where the tree holds the saved layouts
    capsys.readouterr()
    assert main(["naps", path]) == 0
    assert main(["layout", path, "--method", "pca", "--name", "ep", "--no-progress"]) == 0
    assert verify(path, record=False).ok
    assert np.isfinite(load_layout(path, "m", "h", "ep")["x"].values).all()
