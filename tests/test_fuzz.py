"""Property-based fuzzing, bounded in examples and time: decoders with hypothesis, the HTTP API with schemathesis."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error

from klgrade.constants import NUM_GRADES
from klgrade.data.io import read_image
from klgrade.data.sources import find_samples
from klgrade.errors import DataLayoutError, ImageReadError
from klgrade.serve.local import local_server

from helpers import EXAMPLES, compress_dicom, knee_image, write_dicom

FUZZ_EXAMPLES = 300
API_EXAMPLES = 60


def _seed_files(tmp_dir) -> list[bytes]:
    """Real files of every decoder klgrade runs: JPEG and PNG radiographs (one with an EXIF orientation), 16-bit
    PNG, TIFF, DICOM uncompressed and compressed through GDCM (JPEG lossless, JPEG-LS)."""
    radiograph = sorted(EXAMPLES.glob("*.jpg"))[0].read_bytes()
    grey = np.asarray(Image.open(io.BytesIO(radiograph)))[::2, ::2]
    encoded = []
    turned = Image.Exif()
    turned[0x0112] = 6
    for image, image_format, options in ((Image.fromarray(grey), "PNG", {}),
                                         (Image.fromarray(grey.astype(np.uint16) * 250), "PNG", {}),
                                         (Image.fromarray(grey), "TIFF", {}), (Image.fromarray(grey), "BMP", {}),
                                         (Image.fromarray(grey), "JPEG", {"exif": turned})):
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **options)
        encoded.append(buffer.getvalue())
    dicom = write_dicom(tmp_dir / "seed.dcm", knee_image().astype(np.uint16) * 16, "MONOCHROME2", window=(1000, 800))
    compressed = [compress_dicom(dicom, tmp_dir / f"{syntax}.dcm", syntax).read_bytes()
                  for syntax in ("JPEGLosslessProcess14_1", "JPEGLSLossless")]
    return [radiograph, *encoded, dicom.read_bytes(), *compressed]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few bytes flipped, a run inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position:position + draw(st.integers(1, 64))]
        else:
            del data[max(1, position):]
        if not data:
            break
    return bytes(data)


def test_mutated_images_raise_only_image_read_errors(tmp_path_factory):
    seeds = _seed_files(tmp_path_factory.mktemp("seeds"))
    names = ["x.jpg", "x.png", "x.dcm", "IMG0001"]

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=mutated(seeds), name=st.sampled_from(names))
    def decode(data: bytes, name: str) -> None:
        try:
            array = read_image(data, name=name)
        except ImageReadError as exc:
            assert exc.reason and "\n" not in exc.reason
            return
        assert array.ndim == 2 and array.dtype == np.float32 and np.isfinite(array).all()

    decode()


def test_mutated_manifests_give_knees_or_one_data_layout_error(tmp_path_factory):
    """A manifest as people and spreadsheets damage it (bytes flipped, cut short, another encoding, stray quotes or
    separators): its knees, bad rows reported one per line, or one DataLayoutError, never another exception."""
    folder = tmp_path_factory.mktemp("manifest")
    for grade in range(3):
        Image.fromarray(knee_image(grade)).save(folder / f"900000{grade}L.png")
    (folder / "caf\u00e9.png").write_bytes((folder / "9000000L.png").read_bytes())
    seeds = ["path,grade,patient_id,side\n9000000L.png,0,P1,L\n9000001L.png,KL1,P1,R\ncaf\u00e9.png,2.0,,\n",
             "\ufeffPath;Grade\r\n9000002L.png;2\r\n", "path\tgrade\tsplit\n9000001L.png\t1\tval\n"]
    seed_bytes = [seed.encode(encoding, errors="replace") for seed in seeds for encoding in ("utf-8", "latin-1")]
    manifest = folder / "knees.csv"

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=mutated(seed_bytes) | st.binary(max_size=200))
    def read(data: bytes) -> None:
        manifest.write_bytes(data)
        problems: list[ImageReadError] = []
        try:
            samples = find_samples(manifest, problems)
        except DataLayoutError as exc:
            assert "\n" not in str(exc)
            return
        assert samples and all(0 <= s.grade < NUM_GRADES and Path(s.path).exists() for s in samples)
        assert all("\n" not in str(problem) for problem in problems)

    read()


def test_no_generated_request_gets_a_server_error(tiny_checkpoint):
    """schemathesis generates valid and invalid requests for every operation of the schema, against a real server.

    Its pytest integration does not run under pytest 9.2 (it sets `node._nodeid`), so its strategies are
    driven by hypothesis directly.
    """
    with local_server("--checkpoint", str(tiny_checkpoint), "--max-upload-mb", "1") as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {(o.method.upper(), o.path) for o in operations} >= {("POST", "/v1/grade"), ("GET", "/v1/model")}
        statuses: list[int] = []
        grade = next(o for o in operations if o.path == "/v1/grade")  # the only operation with inputs to break
        plan = [(o, schemathesis.GenerationMode.POSITIVE) for o in operations] + [(grade, schemathesis.GenerationMode.NEGATIVE)]
        for operation, mode in plan:

            @settings(max_examples=API_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def call(case) -> None:
                response = case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=60)
                statuses.append(response.status_code)

            call()
    assert any(400 <= status < 500 for status in statuses) and 200 in statuses
