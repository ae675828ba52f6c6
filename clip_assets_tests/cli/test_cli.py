"""The command line and a user's mistakes: one line on stderr, a non-zero exit, never a traceback.

Each case runs the real `main` against real files; where the mistake must be caught before the
model loads, the model points at a checkpoint that does not exist, so loading it would fail with
a different message.
"""

import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.cli import main
from clip_assets.config.layout import DataLayout


def one_line_error(capsys, code: int, expected_code: int | None = None) -> str:
    """The single line a mistake prints; asserts nothing else was printed and the exit is non-zero."""
    out, err = capsys.readouterr()
    assert code != 0 and (expected_code is None or code == expected_code), (code, err)
    assert "Traceback" not in err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_model(settings, tmp_path):
    """The test settings, but with weights that cannot be loaded."""
    return settings.model_copy(update={"pretrained": str(tmp_path / "missing" / "weights.pt")})


@pytest.mark.parametrize("k", ["0", "-3", "three"])
def test_search_refuses_a_bad_k_before_anything_loads(no_model, cli_env, capsys, k):
    cli_env(no_model)
    line = one_line_error(capsys, main(["search", "a red circle", "-k", k]), 2)
    assert line.startswith("clip-assets search: argument -k:") and "at least 1" in line


@pytest.mark.parametrize("text", ["", "   "])
def test_search_refuses_an_empty_query(no_model, cli_env, capsys, text):
    cli_env(no_model)
    line = one_line_error(capsys, main(["search", text]))
    assert "text query is empty" in line


def test_search_wants_a_text_or_an_image(no_model, cli_env, capsys):
    cli_env(no_model)
    assert "one of them" in one_line_error(capsys, main(["search"]), 2)
    assert "one of them" in one_line_error(capsys, main(["search", "x", "--image", "a.png"]), 2)


def test_search_refuses_an_image_query_that_is_not_an_image(settings, no_model, cli_env, capsys, tmp_path):
    cli_env(no_model)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture\n")
    line = one_line_error(capsys, main(["search", "--image", str(text_file)]))
    assert str(text_file) in line and "not an image" in line
    line = one_line_error(capsys, main(["search", "--image", str(settings.image_root / "batch-001")]))
    assert "is a folder" in line
    line = one_line_error(capsys, main(["search", "--image", "batch-001/no-such.png"]))
    assert "No image file batch-001/no-such.png" in line
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "is empty" in one_line_error(capsys, main(["search", "--image", str(empty)]))


def test_search_reports_the_projects_own_errors_in_one_line(settings, classified, cli_env, capsys, other_checkpoint):
    cli_env(settings)
    line = one_line_error(capsys, main(["search", "a red circle", "--category", "no-such-category"]), 1)
    assert "known categories" in line
    line = one_line_error(capsys, main(["search", "a red circle", "--batch", "no-such-batch"]), 1)
    assert "no-such-batch" in line
    cli_env(settings.model_copy(update={"pretrained": str(other_checkpoint)}))
    assert "tiny-seed0" in one_line_error(capsys, main(["search", "a red circle"]), 1)


def test_search_timings_go_to_stderr(settings, classified, cli_env, capsys):
    cli_env(settings)
    assert main(["search", "a red circle", "-k", "2", "--json", "--timings"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert err.startswith("timings: start-up ") and "model load" in err and "query" in err


def test_calibrate_refuses_a_binary_labels_file(settings, cli_env, capsys, tmp_path):
    cli_env(settings)
    picture = next((settings.image_root / "batch-001").glob("*.png"))
    labels = tmp_path / "labels.csv"
    labels.write_bytes(picture.read_bytes())
    line = one_line_error(capsys, main(["calibrate", "--labels", str(labels)]), 1)
    assert line.startswith("clip-assets calibrate: ") and "not a UTF-8 text (CSV) file" in line


def test_calibrate_refuses_a_corrupt_parquet_file(settings, cli_env, capsys, tmp_path):
    cli_env(settings)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"path": ["batch-001/x.png"] * 50, "labels": ["red"] * 50}), good)
    corrupt = tmp_path / "labels.parquet"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut in half: no footer
    line = one_line_error(capsys, main(["calibrate", "--labels", str(corrupt)]), 1)
    assert "not a readable parquet file" in line
    misnamed = tmp_path / "labels.csv"  # parquet under a CSV name is read as parquet
    misnamed.write_bytes(corrupt.read_bytes())
    assert "not a readable parquet file" in one_line_error(capsys, main(["calibrate", "--labels", str(misnamed)]), 1)


def test_calibrate_before_anything_was_classified(settings, cli_env, capsys, tmp_path):
    cli_env(settings)
    assert not DataLayout(settings.data_dir).duckdb_path.exists()
    labels = tmp_path / "labels.csv"
    labels.write_text("path,labels\nbatch-001/a.png,red\n")
    line = one_line_error(capsys, main(["calibrate", "--labels", str(labels)]), 1)
    assert "No DuckDB file" in line and "materialize" in line
    assert not DataLayout(settings.data_dir).duckdb_path.exists()  # nothing created by looking


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--heldout-fraction", "2", "between 0 and 1"),
    ("--heldout-fraction", "0", "between 0 and 1"),
    ("--target-precision", "7", "at most 1"),
    ("--target-precision", "high", "at most 1"),
])
def test_calibrate_refuses_out_of_range_options(no_model, cli_env, capsys, tmp_path, option, value, expected):
    cli_env(no_model)
    line = one_line_error(capsys, main(["calibrate", "--labels", str(tmp_path / "labels.csv"), option, value]), 2)
    assert option in line and expected in line


def test_a_bad_setting_in_the_environment_is_one_line(settings, cli_env, monkeypatch, capsys):
    cli_env(settings)
    monkeypatch.setenv("CLIP_ASSETS_BATCH_SIZE", "lots")
    line = one_line_error(capsys, main(["search", "a red circle"]), 2)
    assert "CLIP_ASSETS_BATCH_SIZE='lots'" in line and "valid integer" in line


def test_serve_on_a_port_in_use_says_so_before_the_model_loads(no_model, cli_env, capsys):
    cli_env(no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(capsys, main(["serve", "--port", str(port)]), 1)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    assert "port number" in one_line_error(capsys, main(["serve", "--port", "99999"]), 2)


def test_the_console_script_exits_fast_after_a_search_with_its_output_and_exit_code(settings, classified, cli_env):
    """`run` skips the interpreter's teardown after a search: what it printed must all be there, and
    the exit code must be main's."""
    import json
    import subprocess
    import sys

    cli_env(settings)
    script = "from clip_assets.cli import run; run()"
    done = subprocess.run([sys.executable, "-c", script, "search", "a red circle", "-k", "4", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [set(json.loads(line)) >= {"image_id", "path", "score"} for line in done.stdout.splitlines()] == [True] * 4
    refused = subprocess.run([sys.executable, "-c", script, "search", "a red circle", "-k", "0"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.splitlines()) == 1
