"""No hang, no unbounded read, no traceback, no lost result: the inputs and options of the reliability audit."""

from __future__ import annotations

import io
import json
import shutil
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from klgrade.cli import empty_argument
from klgrade.data.io import read_image
from klgrade.data.sources import find_samples, is_image_file
from klgrade.errors import CheckpointError, DataLayoutError, ImageReadError
from klgrade.infer.predictor import Predictor
from klgrade.models.weights import METADATA_KEY
from klgrade.serve.app import Settings, create_app
from klgrade.serve.local import local_server

from helpers import EXAMPLES, copy_real_images, invoke_cli, knee_image, run_cli, save, write_dicom

EXAMPLE = sorted(EXAMPLES.glob("KL3_*.jpg"))[0]
CLI_SECONDS = 120  # a hang fails the test instead of the suite


def one_line_error(result, *needles: str) -> None:
    """Exit 1, no traceback, and an `error:` line naming every needle."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any(all(n in line for n in needles) for line in lines), result.stderr[-2000:]


def predict_json(*args: str):
    result = run_cli("predict", *args, "--format", "json", timeout=CLI_SECONDS)
    return result, (json.loads(result.stdout) if result.stdout.strip() else [])


# 1, 2: links, pipes and devices ----------------------------------------------------------------------------------

def test_a_symlink_loop_is_reported_and_the_good_file_still_graded(tiny_checkpoint, tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(EXAMPLE.read_bytes())
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    result, rows = predict_json(str(good), str(loop), "--checkpoint", str(tiny_checkpoint))
    one_line_error(result, "loop.png", "symbolic link loop")
    assert rows[0]["path"] == str(good) and 0 <= rows[0]["grade"] <= 4
    assert rows[1]["error"] == "symbolic link loop"


def test_a_fifo_and_a_link_to_dev_zero_are_refused_without_reading(tiny_checkpoint, tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    zero = tmp_path / "z.png"
    zero.symlink_to("/dev/zero")
    started = time.monotonic()
    result, rows = predict_json(str(fifo), str(zero), str(EXAMPLE), "--checkpoint", str(tiny_checkpoint))
    assert time.monotonic() - started < CLI_SECONDS
    one_line_error(result, "x.png", "not a regular file")
    assert [row.get("error") for row in rows[:2]] == ["not a regular file (a pipe, device or socket)"] * 2
    assert "grade" in rows[2]


def test_a_fifo_or_a_run_folder_given_as_weights_is_refused_in_words_without_waiting(tiny_checkpoint, tmp_path):
    """A pipe as `--teacher` hung `train` (the run record opened it to digest it: an open waits for a writer); a run
    folder as `--checkpoint` was "checkpoint not found"."""
    for split, grade in [(split, grade) for split in ("train", "val") for grade in range(5)]:
        save(Image.fromarray(knee_image(grade + 10 * len(split))), tmp_path / "data" / split / str(grade) / f"90000{len(split)}{grade}L.png")
    fifo = tmp_path / "teacher.safetensors"
    os.mkfifo(fifo)
    training = run_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--teacher", str(fifo),
                       "--epochs", "1", timeout=CLI_SECONDS)
    one_line_error(training, "teacher.safetensors", "not a regular file")
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    shutil.copy(tiny_checkpoint, run / "best.safetensors")
    graded = invoke_cli("predict", str(EXAMPLE), "--checkpoint", str(run))
    assert graded.returncode == 1 and graded.stderr == (
        f"error: {run}: a folder, not a checkpoint (give its best.safetensors)\n")
    onnx_pipe = tmp_path / "model.onnx"  # ONNX Runtime opened it and waited for good
    os.mkfifo(onnx_pipe)
    served = run_cli("predict", str(EXAMPLE), "--checkpoint", str(onnx_pipe), "--backend", "onnx", timeout=CLI_SECONDS)
    one_line_error(served, "model.onnx", "not a regular file")
    onnx_folder = tmp_path / "exported.onnx"
    onnx_folder.mkdir()
    graded = invoke_cli("predict", str(EXAMPLE), "--checkpoint", str(onnx_folder), "--backend", "onnx")
    assert graded.returncode == 1 and graded.stderr == f"error: {onnx_folder}: a folder, not an ONNX model\n"


def test_summary_and_evaluate_report_pipes_and_dangling_links_instead_of_skipping_them(tiny_checkpoint, tmp_path):
    for grade in range(5):
        save(Image.fromarray(knee_image(grade)), tmp_path / "data" / str(grade) / f"900000{grade}L.png")
    os.mkfifo(tmp_path / "data" / "2" / "pipe.png")
    (tmp_path / "data" / "3" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    summary = run_cli("data", "summary", str(tmp_path / "data"), "--json", timeout=CLI_SECONDS)
    one_line_error(summary, "pipe.png", "not a regular file")
    assert "broken symbolic link" in summary.stderr
    assert json.loads(summary.stdout)["images"] == 7
    evaluation = run_cli("evaluate", "--data", str(tmp_path / "data"), "--checkpoint", str(tiny_checkpoint), "--json",
                         timeout=CLI_SECONDS)
    one_line_error(evaluation, "gone.png", "broken symbolic link")
    assert json.loads(evaluation.stdout)["n"] == 5
    os.mkfifo(tmp_path / "knees.csv")  # a pipe as DATA was "cannot list folder (Not a directory)"
    piped = invoke_cli("data", "summary", str(tmp_path / "knees.csv"))
    assert piped.returncode == 1
    assert piped.stderr == f"error: {tmp_path / 'knees.csv'}: not a regular file (a pipe, device or socket)\n"


# 3, 4, 5: the service ------------------------------------------------------------------------------------------

def test_onnx_only_service_answers_explain_with_a_warning_not_500(tiny_checkpoint, tmp_path):
    from klgrade.infer.onnx import export_onnx

    onnx_file = export_onnx(tiny_checkpoint, tmp_path / "m.onnx")
    with TestClient(create_app(Settings(checkpoints=[str(onnx_file)], backend="onnx"))) as client:
        response = client.post("/v1/grade?explain=true", files={"file": (EXAMPLE.name, EXAMPLE.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["heatmap_png"] is None
    assert any("explanation unavailable" in w for w in body["warnings"])


def test_upload_pixel_limit_refuses_a_huge_image_before_decoding(tiny_checkpoint):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((7999, 7999), np.uint16)).save(buffer, format="PNG")
    with TestClient(create_app(Settings(checkpoints=[str(tiny_checkpoint)]))) as client:
        response = client.post("/v1/grade", files={"file": ("huge.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 422
    assert "exceeds the 30 MP limit" in response.json()["detail"]


def test_a_body_that_never_arrives_gets_408_within_the_timeout(tiny_checkpoint):
    with local_server("--checkpoint", str(tiny_checkpoint), "--body-timeout", "1") as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            started = time.monotonic()
            connection.sendall(b"POST /v1/grade HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                               b"Content-Length: 20000000\r\n\r\n" + b"x" * 30_000)
            answer = connection.recv(4096).decode(errors="replace")
            waited = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert waited < 10


def test_concurrent_requests_are_graded_in_batches_not_one_at_a_time(tiny_checkpoint):
    app = create_app(Settings(checkpoints=[str(tiny_checkpoint)]))
    batch_sizes = []
    with TestClient(app) as client:
        predictor = app.state.predictor
        plain = predictor.grade_prepared

        def slow_grade(prepared, *args):
            batch_sizes.append(len(prepared))
            time.sleep(0.5)  # while this batch runs, the other requests queue up
            return plain(prepared, *args)

        predictor.grade_prepared = slow_grade

        def post(_):
            return client.post("/v1/grade", files={"file": ("k.jpg", EXAMPLE.read_bytes(), "image/jpeg")}).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, range(8)))
    assert statuses == [200] * 8
    assert sum(batch_sizes) == 8 and max(batch_sizes) > 1, batch_sizes


# 6: manifests and folders --------------------------------------------------------------------------------------

def _manifest(tmp_path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    for grade in range(3):
        save(Image.fromarray(knee_image(grade)), tmp_path / f"900000{grade}L.png")
    path = tmp_path / "manifest.csv"
    path.write_bytes("\n".join(lines).encode(encoding))
    return path


def test_bad_manifest_rows_are_reported_and_the_rest_evaluated(tiny_checkpoint, tmp_path):
    manifest = _manifest(tmp_path, ["path,grade", "9000000L.png,0", "9000001L.png,3.0", "9000002L.png,7",
                                    "9000002L.png,-1", "9000002L.png,two", "missing.png,1", "9000002L.png"])
    problems: list[ImageReadError] = []
    samples = find_samples(manifest, problems)
    assert [s.grade for s in samples] == [0, 3]
    assert [p.path.rsplit(":", 1)[1] for p in problems] == ["4", "5", "6", "7", "8"]
    with pytest.raises(DataLayoutError, match="manifest.csv:4: grade '7'"):
        find_samples(manifest)
    result = invoke_cli("evaluate", "--data", str(manifest), "--checkpoint", str(tiny_checkpoint), "--json")
    one_line_error(result, "manifest.csv:7", "missing.png")
    assert json.loads(result.stdout)["n"] == 2


def test_excel_bom_manifest_is_read_and_a_non_utf8_one_is_a_clear_error(tmp_path):
    bom = _manifest(tmp_path, ["path,grade", "9000000L.png,1"], encoding="utf-8-sig")
    assert [s.grade for s in find_samples(bom)] == [1]
    latin = _manifest(tmp_path, ["path,grade", "9000000L.png,1", "caf\u00e9.png,2"], encoding="latin-1")
    with pytest.raises(DataLayoutError, match="not UTF-8"):
        find_samples(latin)


def test_an_unlistable_grade_folder_is_reported_not_a_traceback(tmp_path, monkeypatch):
    for grade in (0, 1):
        save(Image.fromarray(knee_image(grade)), tmp_path / str(grade) / f"900000{grade}L.png")
    original = os.scandir

    def scandir(folder="."):  # root may list any folder, so the refusal is staged (shutil passes descriptors)
        if isinstance(folder, (str, os.PathLike)) and Path(folder).name == "1":
            raise PermissionError(13, "Permission denied")
        return original(folder)

    monkeypatch.setattr(os, "scandir", scandir)
    problems: list[ImageReadError] = []
    assert [s.grade for s in find_samples(tmp_path, problems)] == [0]
    assert problems[0].reason == "cannot list folder (Permission denied)"
    with pytest.raises(DataLayoutError, match="cannot list folder"):
        find_samples(tmp_path)


def test_an_unreadable_extensionless_file_is_listed_and_reported(tmp_path, monkeypatch):
    path = tmp_path / "IMG0001"
    path.write_bytes(b"\0" * 200)
    original_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return original_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    assert is_image_file(path)
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ImageReadError, match="permission denied"):
        read_image(path)


# 7: option values ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["predict", "EXAMPLE", "--batch-size", "0"], "--batch-size"),
    (["predict", "EXAMPLE", "--batch-size", "-1"], "--batch-size"),
    (["predict", "EXAMPLE", "--workers", "0"], "--workers"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--max-upload-mb", "-1"], "--max-upload-mb"),
])
def test_out_of_range_numbers_are_usage_errors(args, needle):
    result = invoke_cli(*[str(EXAMPLE) if a == "EXAMPLE" else a for a in args])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: Invalid value for '{needle}': ") and result.stderr.count("\n") == 1


def test_usage_errors_are_one_line_naming_the_help_to_read():
    """A misspelt option, a missing argument or an unknown command was Typer's usage line, a hint and a boxed panel:
    five lines unlike every other error's one."""
    for args, said in [(["predict", "--formt", "json", str(EXAMPLE)],
                        "No such option: --formt (Possible options: --format, --out) (see 'klgrade predict --help')"),
                       (["predict"], "Missing argument 'INPUT' (see 'klgrade predict --help')"),
                       (["data", "summry"], "No such command 'summry'. Did you mean 'summary'? (see 'klgrade data --help')")]:
        result = invoke_cli(*args)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {said}\n")
    alone = invoke_cli()
    assert "Usage: klgrade [OPTIONS] COMMAND" in alone.stdout + alone.stderr  # `klgrade` alone: its help


def test_version_is_one_line_naming_klgrade_torch_and_python():
    """What a methods section or a bug report names; `klgrade --version` was "No such option"."""
    import platform

    import torch

    import klgrade

    result = invoke_cli("--version")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (f"klgrade {klgrade.__version__} (torch {torch.__version__.split('+')[0]}, Python "
                             f"{platform.python_version()})\n")


def test_an_empty_argument_is_refused_before_anything_runs(tmp_path):
    """`predict "$IMAGE"` with the variable unset graded every image below the current folder, and `train --out
    "$RUN"` trained into it: as a path, "" is the current folder."""
    save(Image.fromarray(knee_image(1)), tmp_path / "here" / "9000001L.png")
    for args, said in [(["predict", "--explain", ""], "the argument after --explain is empty"),
                       (["predict", str(EXAMPLE), "--out", ""], "the argument after --out is empty"),
                       (["train", "--data", str(tmp_path), "--out="], "--out is given an empty value")]:
        result = subprocess.run([sys.executable, "-m", "klgrade", *args], capture_output=True, text=True,
                                timeout=CLI_SECONDS, cwd=tmp_path / "here")
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == f"error: {said} (an unset shell variable?)\n"
    assert sorted(path.name for path in (tmp_path / "here").iterdir()) == ["9000001L.png"]
    assert empty_argument(["predict", "--out=run=1", "--option", "width=", "x.png"]) is None  # values, not empty


def test_serve_on_a_taken_port_or_a_foreign_address_is_one_line_before_the_model_loads(tmp_path):
    absent = str(tmp_path / "absent.safetensors")  # were the model loaded first, this would be the error
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = invoke_cli("serve", "--port", str(port), "--checkpoint", absent)
    assert busy.returncode == 1
    assert busy.stderr == f"error: 127.0.0.1:{port}: cannot listen there (Address already in use)\n"
    foreign = invoke_cli("serve", "--host", "192.0.2.1", "--port", "0", "--checkpoint", absent)  # TEST-NET-1
    assert foreign.returncode == 1 and foreign.stderr.startswith("error: 192.0.2.1:0: cannot listen there (")


def test_bad_devices_and_outputs_are_one_line_errors(tiny_checkpoint, tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    checkpoint = ["--checkpoint", str(tiny_checkpoint)]
    one_line_error(invoke_cli("predict", str(EXAMPLE), *checkpoint, "--out", str(existing)),
                   "file.txt", "--out names an existing file")
    one_line_error(invoke_cli("evaluate", "--data", str(tmp_path), "--out", str(existing), *checkpoint),
                   "--out names an existing file")
    through_a_file = str(existing / "out")  # a folder that cannot be made: said before any work, not a traceback
    one_line_error(invoke_cli("predict", str(EXAMPLE), *checkpoint, "--out", through_a_file),
                   f"{through_a_file}: --out cannot be made (")
    for command in (["data", "manifest", str(tmp_path)], ["export-onnx", *checkpoint],
                    ["calibrate", *checkpoint, "--data", str(tmp_path)]):
        one_line_error(invoke_cli(*command, "--out", f"{through_a_file}/m.safetensors"),
                       f"{through_a_file}/m.safetensors: its folder cannot be made (")
    one_line_error(invoke_cli("predict", str(EXAMPLE), *checkpoint, "--device", "banana"), "banana", "not a device")
    one_line_error(invoke_cli("predict", str(EXAMPLE), *checkpoint, "--device", "cuda"), "no CUDA GPU")
    exported = invoke_cli("export-onnx", *checkpoint, "--out", str(tmp_path / "new" / "folder" / "m.onnx"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "new" / "folder" / "m.onnx").stat().st_size > 1000


def test_an_output_folder_that_cannot_be_written_is_a_one_line_error_before_the_work(tiny_checkpoint, tmp_path,
                                                                                    monkeypatch):
    """A read-only --out (a mount, a share, a folder of another user) was found only when the first file was
    written, after the work: a traceback. Now each command tries a file there when it checks its options. The
    refusal is the system's own, simulated here (this suite may run as root, whom permissions do not stop)."""
    import tempfile

    from klgrade import cli

    read_only = tmp_path / "read_only"
    read_only.mkdir()

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == read_only:
            raise OSError(30, "Read-only file system")
        return tempfile.TemporaryFile(*args, dir=dir, **kwargs)

    monkeypatch.setattr(cli, "TemporaryFile", refuse)
    checkpoint = ["--checkpoint", str(tiny_checkpoint)]
    for command, named in ((["predict", str(EXAMPLE), *checkpoint, "--out", str(read_only)], "--out"),
                           (["evaluate", "--data", str(tmp_path / "absent"), *checkpoint, "--out", str(read_only)],
                            "--out"),
                           (["export-onnx", *checkpoint, "--out", str(read_only / "m.onnx")], "its folder"),
                           (["data", "manifest", str(tmp_path), "--out", str(read_only / "k.csv")], "its folder")):
        one_line_error(invoke_cli(*command), f"{named} cannot be written there (Read-only file system)")


def test_a_full_disk_mid_run_is_a_one_line_error_naming_the_file(tiny_checkpoint, tmp_path, monkeypatch):
    """A write the system refuses mid-run (here the disk fills at the first heatmap: PIL meets it on a file handle,
    so its error names no file) was a traceback; now `error: <the file being written>: <the system's reason>`, exit
    1, and no half-written file."""
    from PIL import Image as PILImage

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", disk_full)
    out = tmp_path / "out"
    one_line_error(invoke_cli("predict", str(EXAMPLE), "--explain", "--out", str(out), "--checkpoint",
                              str(tiny_checkpoint)),
                   f"{out / 'heatmaps' / (EXAMPLE.stem + '_gradcam.png')}: No space left on device")
    assert not [path for path in out.rglob("*") if path.is_file()]


@pytest.mark.skipif(sys.platform != "linux", reason="a file name that is no UTF-8 needs a filesystem that takes bytes")
def test_file_names_that_are_no_utf8_or_hold_a_line_break_are_graded_and_written(tiny_checkpoint, tmp_path,
                                                                                  monkeypatch):
    """Linux allows any bytes in a name: `knee\xff.jpg` printed fine but stopped `predict --out` with a
    UnicodeEncodeError (a traceback) when predictions.csv was written. Its bytes now go into the files as read."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in (b"knee\xff.jpg", b"line\nbreak.jpg"):
        Path(os.fsdecode(os.fsencode(inputs) + b"/" + name)).write_bytes(EXAMPLE.read_bytes())
    out = tmp_path / "out"
    result = invoke_cli("predict", str(inputs), "--explain", "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                        "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    written = (out / "predictions.csv").read_bytes()
    assert b"knee\xff.jpg" in written and b'line\nbreak.jpg"' in written
    assert len(list((out / "heatmaps").iterdir())) == 2
    # Printed, under a locale whose stdout refuses such names (en_US.UTF-8): the bytes, as `ls` prints them.
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8:strict")
    for output_format in ("csv", "table"):
        printed = subprocess.run([sys.executable, "-m", "klgrade", "predict", str(inputs), "--checkpoint",
                                  str(tiny_checkpoint), "--format", output_format], capture_output=True, timeout=300)
        assert printed.returncode == 0 and b"Traceback" not in printed.stderr, printed.stderr[-2000:]
        assert b"knee\xff.jpg" in printed.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="a file name that is no UTF-8 needs a filesystem that takes bytes")
def test_a_file_name_that_is_no_utf8_goes_through_a_manifest_and_into_the_training_cache(tmp_path):
    """`data manifest` wrote such a name as its bytes and the manifest reader then refused the manifest as "not
    UTF-8"; the training cache's key could not be made of it (a traceback in `train`, `cv` and `reproduce`)."""
    from klgrade.data.cache import cache_key
    from klgrade.data.preprocess import PreprocessConfig

    data = tmp_path / "data"
    for grade in range(2):
        save(Image.fromarray(knee_image(grade)), data / str(grade) / f"900000{grade}L.png")
    odd = Path(os.fsdecode(os.fsencode(data / "1") + b"/caf\xe9.png"))
    odd.write_bytes((data / "1" / "9000001L.png").read_bytes())
    assert len(cache_key(find_samples(data), PreprocessConfig())) == 20
    manifest = tmp_path / "knees.csv"
    assert invoke_cli("data", "manifest", str(data), "--out", str(manifest)).returncode == 0
    assert b"1/caf\xe9.png,1," in manifest.read_bytes()
    listed = find_samples(manifest)
    assert sorted(s.path for s in listed) == sorted(s.path for s in find_samples(data)) and str(odd) in {
        s.path for s in listed}
    # Such bytes anywhere but in a path naming a file by them: a manifest saved in another encoding, as before.
    for row in (b"data/1/caf\xe9.png,1,P\xe9\n", b"data/1/cafe\xe9.png,1,P\n"):
        (tmp_path / "cp1252.csv").write_bytes(b"path,grade,patient_id\n" + row)
        with pytest.raises(DataLayoutError, match="not UTF-8"):
            find_samples(tmp_path / "cp1252.csv")


def test_an_error_naming_a_file_with_a_line_break_stays_one_line(tmp_path):
    """A name may hold a line break (Linux allows it): the error printed it as two lines, which a script reading
    one line per error splits in two. Written as `\\n`, as `ls` writes it."""
    missing = tmp_path / "two\nlines"
    result = invoke_cli("evaluate", "--data", str(missing))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {tmp_path}/two\\nlines")


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _terminated_once(command: list[str], started, timeout: float = 240) -> tuple[subprocess.Popen, str, set[int]]:
    """Run `command` (klgrade's arguments), send it SIGTERM once `started()` holds; return the process, its stderr and
    the processes it had started by then."""
    process = subprocess.Popen([sys.executable, "-m", "klgrade", *command], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not started(process) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    children = _children(process.pid)
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    return process, stderr, children


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_stops_a_training_with_a_failure_status_and_a_resumable_run(kneekl224, tmp_path):
    """Lightning's own SIGTERM handler ended `train` at the end of a step with exit status 0 and no word, so a
    batch script or a scheduler took a stopped training for a finished one."""
    out = tmp_path / "run"
    process, stderr, _ = _terminated_once(
        ["train", "--data", str(kneekl224), "--out", str(out), "--epochs", "500", "--limit", "24", "--image-size", "64",
         "--option", "width=32", "--option", "heads=2", "--device", "cpu", "--quiet"],
        lambda _: (out / "last.ckpt").exists())
    assert process.returncode == 128 + 15 and stderr.endswith("error: stopped by SIGTERM\n"), stderr[-2000:]
    assert not (out / "metrics.json").exists() and not list(out.rglob(".*.tmp*"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_to_reproduce_stops_its_fold_workers_too(kneekl224, tmp_path):
    """Only the parent of `reproduce --jobs 2` died: its two workers went on training, orphaned, into the run folder
    a rerun would write to as well."""
    data, out = tmp_path / "data", tmp_path / "out"
    copy_real_images(kneekl224, data / "train", 6, split="train")
    copy_real_images(kneekl224, data / "val", 1, split="val")
    process, stderr, workers = _terminated_once(
        ["reproduce", "--data", str(data), "--out", str(out), "--profile", "paper", "--device", "cpu", "--jobs", "2"],
        lambda process: len(_children(process.pid)) >= 2 and len(list(out.rglob("logs"))) >= 2)
    assert process.returncode == 128 + 15 and "error: stopped by SIGTERM" in stderr, stderr[-2000:]
    assert len(workers) >= 2
    time.sleep(2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_heatmaps_written_into_the_folder_graded_next_are_left_out_not_graded(tiny_checkpoint, tmp_path):
    """`predict scans --explain --out scans`, then `predict scans`: klgrade graded its own Grad-CAM overlays as knees
    (some answered gradable, with a grade); then it refused them as error rows, so that every rerun exited 1. Found in
    a folder they are left out, with a warning; named on the command line, refused."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for example in sorted(EXAMPLES.glob("KL*.jpg"))[:3]:
        (scans / example.name).write_bytes(example.read_bytes())
    first = invoke_cli("predict", str(scans), "--explain", "--out", str(scans), "--checkpoint", str(tiny_checkpoint))
    assert first.returncode == 0, first.stderr[-2000:]
    again = invoke_cli("predict", str(scans), "--checkpoint", str(tiny_checkpoint), "--format", "json")
    assert again.returncode == 0, again.stderr[-2000:]
    rows = json.loads(again.stdout)
    assert sorted(Path(row["path"]).name for row in rows) == sorted(p.name for p in scans.glob("KL*.jpg"))
    assert all(row.get("grade") is not None for row in rows)
    overlays = sorted((scans / "heatmaps").glob("*_gradcam.png"))
    assert len(overlays) == 3 and (f"{scans}: left out 3 Grad-CAM overlay(s) an earlier `klgrade predict --explain` "
                                   f"wrote, e.g. {overlays[0]}") in again.stderr
    named = invoke_cli("predict", str(overlays[0]), "--checkpoint", str(tiny_checkpoint), "--format", "json")
    assert named.returncode == 1 and json.loads(named.stdout)[0]["error"] == (
        "a klgrade heatmap (Grad-CAM overlay), not a radiograph: grade the radiograph it was made from")
    explained_again = invoke_cli("predict", str(scans), "--explain", "--out", str(scans), "--checkpoint",
                                 str(tiny_checkpoint))
    assert explained_again.returncode == 0 and explained_again.stdout == first.stdout


def test_a_failed_command_leaves_no_empty_output_folder_of_its_making(tiny_checkpoint, tmp_path):
    empty_data = tmp_path / "data"
    empty_data.mkdir()
    made = tmp_path / "new" / "deep" / "out"  # made when the options are checked, before the data fails
    one_line_error(invoke_cli("evaluate", "--data", str(empty_data), "--out", str(made),
                              "--checkpoint", str(tiny_checkpoint)), "no grade or split folders")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"  # a folder that was there before is not the command's to remove
    kept.mkdir()
    one_line_error(invoke_cli("train", "--data", str(empty_data), "--out", str(kept), "--epochs", "1"),
                   "no grade or split folders")
    assert kept.is_dir()
    written = invoke_cli("predict", str(tmp_path / "absent.png"), "--out", str(tmp_path / "answers"),
                         "--checkpoint", str(tiny_checkpoint))  # failed, but it wrote its answer: all stays
    assert written.returncode == 1 and (tmp_path / "answers" / "predictions.csv").is_file()


# 8, 9: names, empty folders, formats, DICOM --------------------------------------------------------------------

def test_inputs_with_names_near_the_file_system_s_limit_get_heatmaps(tiny_checkpoint, tmp_path):
    """A 248-byte file name is legal; `<it>_gradcam.png` is not (255 bytes a name): `predict --explain` stopped
    there. Overlay names keep at most 150 bytes of the input's, and two inputs cut to one name stay distinct."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("k" * 240 + "_left.jpg", "k" * 240 + "_right.jpg", "ä" * 120 + ".jpg"):  # 2 bytes per ä
        (inputs / name).write_bytes(EXAMPLE.read_bytes())
    result, rows = predict_json(str(inputs), "--explain", "--out", str(tmp_path / "out"), "--checkpoint",
                                str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr[-2000:]
    heatmaps = [Path(row["heatmap"]) for row in rows]
    assert len(set(heatmaps)) == 3 and all(path.is_file() for path in heatmaps)
    assert max(len(os.fsencode(path.name)) for path in heatmaps) <= 150 + len("_2_gradcam.png")


def test_an_output_named_near_the_limit_is_written_whole(tmp_path):
    """Its temporary name (`.<stem>.tmp<pid><suffix>`) was 14 bytes longer than the output's own: a legal 250-byte
    name could not be written."""
    from klgrade.files import write_text_atomic

    target = tmp_path / ("x" * 246 + ".csv")
    write_text_atomic(target, "path,grade\n")
    assert target.read_text() == "path,grade\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_same_named_inputs_get_distinct_heatmaps(tiny_checkpoint, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "knee.jpg").write_bytes(EXAMPLE.read_bytes())
    result, rows = predict_json(str(tmp_path / "a" / "knee.jpg"), str(tmp_path / "b" / "knee.jpg"), "--explain",
                                "--out", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    heatmaps = [row["heatmap"] for row in rows]
    assert len(set(heatmaps)) == 2 and all(Path(h).is_file() for h in heatmaps)


def test_an_empty_folder_is_an_error_not_an_empty_table(tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(invoke_cli("predict", str(tmp_path / "empty"), "--checkpoint", str(tiny_checkpoint)),
                   "no images found")


@pytest.mark.parametrize("image_format", ["WEBP", "PPM", "GIF"])
def test_formats_outside_the_allow_list_are_refused(tmp_path, image_format):
    path = save(Image.fromarray(knee_image()), tmp_path / f"x.{image_format.lower()}", format=image_format)
    with pytest.raises(ImageReadError, match="not a recognised image"):
        read_image(path)
    renamed = tmp_path / "x.png"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ImageReadError, match="not a recognised image"):
        read_image(renamed)


def test_eps_is_never_handed_to_ghostscript(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    with pytest.raises(ImageReadError, match="not a recognised image"):
        read_image(path)


def test_dicom_with_zero_window_width_is_graded_on_its_raw_values(tmp_path):
    pixels = knee_image().astype(np.uint16) * 8
    array = read_image(write_dicom(tmp_path / "w0.dcm", pixels, "MONOCHROME2", window=(500, 0)))
    np.testing.assert_array_equal(array, pixels.astype(np.float32))


def test_broken_dicom_pixels_are_one_readable_reason(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", knee_image().astype(np.uint16), "MONOCHROME2")
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.reason.startswith("DICOM pixel data cannot be decoded")


def test_a_png_named_dcm_is_graded_by_cli_and_service_alike(tiny_checkpoint, tmp_path):
    path = tmp_path / "knee.dcm"
    path.write_bytes(EXAMPLE.read_bytes())
    assert read_image(path).shape == read_image(EXAMPLE).shape
    result, rows = predict_json(str(path), "--checkpoint", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    with TestClient(create_app(Settings(checkpoints=[str(tiny_checkpoint)]))) as client:
        body = client.post("/v1/grade", files={"file": ("knee.dcm", path.read_bytes(), "application/dicom")}).json()
    assert body["grade"] == rows[0]["grade"]


# 10: damaged checkpoint metadata ---------------------------------------------------------------------------------

def with_metadata(source: Path, target: Path, change=None, raw: str | None = None) -> Path:
    """A copy of `source` whose klgrade metadata is `change`d (or replaced by `raw` text)."""
    with safe_open(str(source), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
        info = json.loads(handle.metadata()[METADATA_KEY])
    if change is not None:
        change(info)
    save_file(state, str(target), metadata={METADATA_KEY: raw if raw is not None else json.dumps(info)})
    return target


def set_field(*keys_and_value):
    *keys, last, value = keys_and_value

    def change(info: dict) -> None:
        for key in keys:
            info = info[key]
        info[last] = value(info[last]) if callable(value) else value
    return change


DAMAGES = {  # each would crash later with a traceback, or answer with a wrong grade set, before the checks
    "negative temperature": (set_field("calibration", "temperature", -1.0), "temperature must be positive"),
    "temperature as text": (set_field("calibration", "temperature", "hot"), "temperature must be a number"),
    "grade 9": (set_field("calibration", "conformal_grades", lambda g: [9] * len(g)), "whole grades 0 to 4"),
    "grades cut short": (set_field("calibration", "conformal_grades", lambda g: g[:10]),
                         "10 conformal_grades for 50 conformal_scores"),
    "a score as text": (set_field("calibration", "conformal_scores", lambda s: ["x"] + s[1:]),
                        "conformal_scores must hold numbers only"),
    "a score above 1": (set_field("calibration", "conformal_scores", lambda s: s[:-1] + [1.5]),
                        "conformal_scores must lie in [0, 1]"),
    "density without precision": (lambda info: info["calibration"]["density"].pop("precision"),
                                  "density: needs means, precision and threshold"),
    "density of another width": (set_field("calibration", "density", "means", [[0.0, 1.0]]),
                                 "density: precision is"),
    "processing of one statistic": (set_field("calibration", "processing", "means", [[0.0]]), "processing: precision"),
    "sharpness of three statistics": (lambda info: info["calibration"]["sharpness"].update(
        means=[[0.0] * 3], precision=np.eye(3).tolist()), "sharpness: 3 statistics, not 2"),
    "framing threshold 0": (set_field("calibration", "framing", "threshold", 0.0), "framing: threshold must be"),
    "framing without weights": (lambda info: info["calibration"]["framing"].pop("weights"), "framing: needs weights"),
    "wider probe as the tighter one": (set_field("calibration", "framing", "wider", True),
                                       "framing: a probe of wider framings"),
    "wider flag as text": (set_field("calibration", "framing_wide", "wider", "yes"),
                           "framing_wide: wider must be true or false"),
    "polarity without bias": (lambda info: info["calibration"]["polarity"].pop("bias"),
                              "polarity: needs weights and bias"),
    "polarity weights with NaN": (set_field("calibration", "polarity", "weights", lambda w: [float("nan")] + w[1:]),
                                  "polarity: weights holds values that are not finite"),
    "calibration as a list": (set_field("calibration", [1, 2]), "calibration: must be a mapping"),
    "no architecture": (lambda info: info.pop("model"), "does not name the model's architecture"),
    "size as text": (set_field("preprocess", "size", "big"), "preprocess: size must be a whole number"),
    "unknown preprocessing": (set_field("preprocess", "sharpen", True), "preprocess: unknown fields ['sharpen']"),
    "no preprocessing": (lambda info: info.pop("preprocess"), "preprocess: must be a mapping of fields"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_metadata_is_refused_naming_the_file_and_field(calibrated, tmp_path, damage):
    change, message = DAMAGES[damage]
    path = with_metadata(calibrated, tmp_path / "damaged.safetensors", change)
    with pytest.raises(CheckpointError) as caught:
        Predictor([path])
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_a_density_of_another_model_is_refused_at_the_first_image(calibrated, tmp_path):
    wide = np.eye(3).tolist()
    path = with_metadata(calibrated, tmp_path / "other.safetensors", set_field(
        "calibration", "density", lambda d: {"means": [[0.0] * 3] * 5, "precision": wide, "threshold": d["threshold"]}))
    predictor = Predictor([path])
    with pytest.raises(CheckpointError, match="density: 3 features, but the model has"):
        predictor.grade_prepared(np.stack([predictor.prepare(knee_image())]))


def test_a_polarity_probe_of_another_model_is_refused_at_the_first_image(calibrated, tmp_path):
    path = with_metadata(calibrated, tmp_path / "other.safetensors",
                         set_field("calibration", "polarity", {"weights": [0.0] * 3, "bias": 0.0}))
    predictor = Predictor([path])
    with pytest.raises(CheckpointError, match="polarity: 3 features, but the model has"):
        predictor.grade_prepared(np.stack([predictor.prepare(knee_image())]))


def test_cli_reports_damaged_metadata_in_one_line(calibrated, tmp_path):
    """Metadata nested 100000 deep was a RecursionError traceback; an ONNX model's metadata was not checked at all."""
    bad_json = with_metadata(calibrated, tmp_path / "json.safetensors", raw="{not json")
    one_line_error(invoke_cli("predict", str(EXAMPLE), "--checkpoint", str(bad_json)), str(bad_json), "not valid JSON")
    deep = with_metadata(calibrated, tmp_path / "deep.safetensors", raw="[" * 100_000 + "]" * 100_000)
    one_line_error(invoke_cli("predict", str(EXAMPLE), "--checkpoint", str(deep)), str(deep), "nested too deeply")
    import onnx

    exported = tmp_path / "m.onnx"
    assert invoke_cli("export-onnx", "--checkpoint", str(calibrated), "--out", str(exported)).returncode == 0
    model = onnx.load(str(exported))
    next(entry for entry in model.metadata_props if entry.key == "klgrade").value = "{not json"
    onnx.save(model, str(exported))
    one_line_error(invoke_cli("predict", str(EXAMPLE), "--backend", "onnx", "--checkpoint", str(exported)),
                   str(exported), "not valid JSON")
    negative = with_metadata(calibrated, tmp_path / "cold.safetensors", set_field("calibration", "temperature", -1.0))
    one_line_error(invoke_cli("predict", str(EXAMPLE), "--checkpoint", str(negative)), str(negative), "temperature")


def test_an_ensemble_of_differently_preprocessed_members_is_refused(tiny_checkpoint, tmp_path):
    other = with_metadata(tiny_checkpoint, tmp_path / "wider.safetensors", set_field("preprocess", "size", 96))
    with pytest.raises(CheckpointError) as refused:  # it named neither member nor what differs
        Predictor([tiny_checkpoint, tiny_checkpoint, other])
    assert str(refused.value) == (f"{tiny_checkpoint} and {other}: ensemble members must be trained with the same "
                                  "preprocessing, not size 64 vs 96; cannot combine them")
    same = with_metadata(tiny_checkpoint, tmp_path / "same.safetensors")
    assert Predictor([tiny_checkpoint, same]).preprocess.size == 64


def test_a_command_run_with_its_output_or_input_closed_still_works_or_says_why(tiny_checkpoint, tmp_path):
    """Started with stdout closed (`>&-`, as a daemon or a cron job may be), every command stopped at once with a
    traceback (Python sets `sys.stdout` to None); with stdin closed, `predict` did too (it handed `sys.stdin.buffer`
    on, even without `-`)."""
    def closed(redirect: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "klgrade", *args, "--checkpoint", str(tiny_checkpoint)]
        return subprocess.run(["bash", "-c", f'exec "$@" {redirect}', "bash", *command], capture_output=True,
                              text=True, timeout=CLI_SECONDS)

    written = closed(">&-", "predict", str(EXAMPLE), "--out", str(tmp_path / "out"))
    assert written.returncode == 0 and written.stderr == "", written.stderr
    assert [row["path"] for row in json.loads((tmp_path / "out" / "predictions.json").read_text())] == [str(EXAMPLE)]
    graded = closed("<&-", "predict", str(EXAMPLE), "--format", "json")
    assert graded.returncode == 0 and json.loads(graded.stdout)[0]["path"] == str(EXAMPLE), graded.stderr
    piped = closed("<&-", "predict", "-")
    assert piped.returncode == 1 and piped.stderr == (
        "error: '-' reads an image from standard input, which is closed here: pipe one in (klgrade predict - < "
        "knee.png)\n")


def test_evaluate_with_a_home_that_cannot_be_written_says_only_its_own_warnings(tiny_checkpoint, kneekl224, tmp_path):
    """A container's read-only home: matplotlib (the plots of `evaluate --out`) printed two lines of its own about
    where it keeps its config, among klgrade's warnings."""
    copy_real_images(kneekl224, tmp_path / "set", 1)
    (tmp_path / "home").write_text("")  # a file: nothing can be made below it
    environment = {key: value for key, value in os.environ.items() if key not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME",
                                                                                    "XDG_CACHE_HOME")}
    result = subprocess.run([sys.executable, "-m", "klgrade", "evaluate", "--data", str(tmp_path / "set"), "--checkpoint",
                             str(tiny_checkpoint), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=CLI_SECONDS, env={**environment, "HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "confusion.png").exists()
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines()), result.stderr
