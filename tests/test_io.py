import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from klgrade.data.io import read_array, read_image, read_radiograph
from klgrade.data.sources import find_samples
from klgrade.errors import ImageReadError

from helpers import compress_dicom, knee_image, run_cli, save, write_dicom


def test_8bit_formats_decode_to_the_same_grey_values(tmp_path):
    grey = knee_image()
    for suffix in ("png", "bmp", "tiff"):
        array = read_image(save(Image.fromarray(grey), tmp_path / f"a.{suffix}"))
        assert array.dtype == np.float32 and array.shape == grey.shape
        np.testing.assert_array_equal(array, grey)
    jpeg = read_image(save(Image.fromarray(grey), tmp_path / "a.jpg", quality=95))
    assert np.abs(jpeg - grey).mean() < 4


def test_16bit_png_keeps_its_range(tmp_path):
    deep = (knee_image().astype(np.uint16) * 200 + 7).astype(np.uint16)
    array = read_image(save(Image.fromarray(deep), tmp_path / "deep.png"))
    assert array.max() > 255
    np.testing.assert_array_equal(array, deep.astype(np.float32))


@pytest.mark.parametrize("suffix", ["jp2", "j2k"])
def test_jpeg_2000_in_8_and_16_bits_decodes_to_the_same_grey_values_and_counts_as_an_image(tmp_path, suffix):
    """An archive's or a PACS viewer's JPEG 2000 export (lossless) was "not a recognised image", and left out of a
    folder unsaid but for a count."""
    grey = knee_image()
    deep = (grey.astype(np.uint16) * 16 + 3).astype(np.uint16)  # 12 bits stored in 16
    for name, pixels in (("grey", grey), ("deep", deep)):
        path = save(Image.fromarray(pixels), tmp_path / "0" / f"{name}.{suffix}")
        np.testing.assert_array_equal(read_image(path), pixels.astype(np.float32))
    assert sorted(Path(s.path).name for s in find_samples(tmp_path)) == [f"deep.{suffix}", f"grey.{suffix}"]


STORED_FOR_ORIENTATION = {
    1: lambda upright: upright,
    2: lambda upright: upright[:, ::-1],
    3: lambda upright: upright[::-1, ::-1],
    4: lambda upright: upright[::-1],
    5: lambda upright: upright.T,
    6: lambda upright: np.rot90(upright, 1),
    7: lambda upright: np.rot90(upright[:, ::-1], -1),
    8: lambda upright: np.rot90(upright, -1),
}
"""How a camera or an export stores an upright image under each EXIF orientation (the tag says how to turn it back:
6 = rotate 90 degrees clockwise to display)."""


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied_so_the_image_reads_as_viewers_show_it(tmp_path, suffix):
    upright = np.random.default_rng(0).integers(0, 256, (40, 64)).astype(np.uint8)
    upright[:8] = 255  # asymmetric and non-square: every wrong turn or mirror shows
    for orientation, stored in STORED_FOR_ORIENTATION.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = save(Image.fromarray(np.ascontiguousarray(stored(upright))), tmp_path / f"o{orientation}.{suffix}",
                    exif=exif, **({"quality": 100} if suffix == "jpg" else {}))
        array = read_image(path)
        assert array.shape == upright.shape, orientation
        assert np.abs(array - upright).mean() < (0.5 if suffix == "png" else 12), orientation


def test_a_broken_exif_block_leaves_the_pixels_as_stored(tmp_path):
    grey = knee_image()
    array = read_image(save(Image.fromarray(grey), tmp_path / "broken.png", exif=b"Exif\x00\x00not an EXIF block"))
    np.testing.assert_array_equal(array, grey)


def test_rgb_rgba_and_palette_become_single_channel(tmp_path):
    grey = knee_image()
    rgb = np.stack([grey] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 255, np.uint8)], axis=-1)
    for name, image in {"rgb.png": Image.fromarray(rgb), "rgba.png": Image.fromarray(rgba, "RGBA"),
                        "pal.png": Image.fromarray(grey).convert("P")}.items():
        array = read_image(save(image, tmp_path / name))
        assert array.ndim == 2 and array.shape == grey.shape
        assert np.abs(array - grey).mean() < 3, name


def test_dicom_monochrome2_applies_rescale(tmp_path):
    pixels = knee_image().astype(np.uint16) * 10
    array = read_image(write_dicom(tmp_path / "mono2.dcm", pixels, "MONOCHROME2", slope=2.0, intercept=-100.0))
    np.testing.assert_allclose(array, pixels * 2.0 - 100.0)


def test_dicom_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    pixels = knee_image().astype(np.uint16) * 10
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] < -0.99
    # A presentation LUT shape INVERSE shows MONOCHROME2 values inverted; beside MONOCHROME1 (as DX files pair
    # them) it is that same inversion, not a second one.
    shown_inverted = read_image(write_dicom(tmp_path / "i2.dcm", pixels, "MONOCHROME2", PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(shown_inverted, mono1)
    paired = read_image(write_dicom(tmp_path / "i1.dcm", pixels, "MONOCHROME1", PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(paired, mono1)
    identity = read_image(write_dicom(tmp_path / "n2.dcm", pixels, "MONOCHROME2", PresentationLUTShape="IDENTITY"))
    np.testing.assert_array_equal(identity, mono2)


def test_dicom_window_is_applied(tmp_path):
    pixels = knee_image().astype(np.uint16) * 10
    windowed = read_image(write_dicom(tmp_path / "w.dcm", pixels, "MONOCHROME2", window=(1000, 400)))
    assert windowed.max() - windowed.min() <= 65535
    plain = read_image(write_dicom(tmp_path / "p.dcm", pixels, "MONOCHROME2"))
    assert not np.allclose(windowed, plain)


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14", "JPEGLSLossless",
                                    "JPEG2000Lossless", "RLELossless"])
def test_compressed_dicom_from_a_pacs_decodes_to_the_same_pixels(tmp_path, syntax):
    """PACS exports of CR/DX radiographs are mostly compressed; JPEG lossless and JPEG-LS need GDCM."""
    pixels = knee_image(size=96).astype(np.uint16) * 13 + 100
    plain = write_dicom(tmp_path / "plain.dcm", pixels, "MONOCHROME2")
    compressed = compress_dicom(plain, tmp_path / f"{syntax}.dcm", syntax)
    assert compressed.read_bytes() != plain.read_bytes()
    np.testing.assert_array_equal(read_image(compressed), pixels.astype(np.float32))


def test_the_view_a_dicom_header_names_is_read(tmp_path):
    pixels = knee_image().astype(np.uint16) * 16
    lateral = read_radiograph(write_dicom(tmp_path / "lat.dcm", pixels, "MONOCHROME2", view="ll "))
    assert lateral.view == "LL"
    np.testing.assert_array_equal(lateral.grey, pixels.astype(np.float32))
    assert read_radiograph(write_dicom(tmp_path / "plain.dcm", pixels, "MONOCHROME2")).view is None
    assert read_radiograph(save(Image.fromarray(knee_image()), tmp_path / "knee.png")).view is None


@pytest.mark.parametrize("elements, side", [({"ImageLaterality": "L"}, "L"), ({"ImageLaterality": "r "}, "R"),
                                            ({"Laterality": "L"}, "L"), ({"ImageLaterality": "R", "Laterality": "L"}, "R"),
                                            ({"ImageLaterality": "B", "Laterality": "L"}, None),
                                            ({"ImageLaterality": "U"}, None), ({}, None)],
                         ids=["image L", "image r", "series L", "image first", "both knees", "unpaired", "silent"])
def test_the_knee_side_a_dicom_header_names_is_read(tmp_path, elements, side):
    """PACS exports name files by UIDs: the side is in the header (the image's ImageLaterality, else the series'
    Laterality); both knees in one image (B) or an unpaired part (U) name no side."""
    path = write_dicom(tmp_path / "1.2.840.10008.dcm", knee_image().astype(np.uint16), "MONOCHROME2", **elements)
    assert read_radiograph(path).side == side


def test_colour_dicom_is_read_as_luma_whatever_its_colour_space(tmp_path):
    """pydicom hands YBR pixel data over as RGB: its first channel is red, not luma (was read as the grey level).
    A palette DICOM stores indices into its colour table, which must be looked up first."""
    import pydicom
    from pydicom.data import get_testdata_file

    ybr = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")  # shipped with pydicom: JPEG baseline, YBR_FULL, red top band
    assert pydicom.dcmread(ybr).PhotometricInterpretation == "YBR_FULL"
    assert read_image(ybr)[0, 0] == pytest.approx(0.299 * 254, abs=1)
    indices = knee_image().astype(np.uint8)
    palette = write_dicom(tmp_path / "palette.dcm", indices, "MONOCHROME2")
    ds = pydicom.dcmread(palette)
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "PALETTE COLOR", 8, 8, 7
    ds.PixelData = indices.tobytes()
    table = (65535 - 257 * np.arange(256)).astype("<u2").tobytes()  # a grey ramp that runs backwards
    for colour in ("Red", "Green", "Blue"):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", table)
    ds.save_as(palette)
    np.testing.assert_allclose(read_image(palette), 65535 - 257 * indices.astype(np.float32), rtol=1e-5)


def test_dicom_without_extension_is_detected_by_magic(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", knee_image().astype(np.uint16), "MONOCHROME2")
    renamed = path.rename(tmp_path / "IMG0001")
    assert read_image(renamed).shape == (64, 64)


def test_a_file_of_several_images_is_refused_but_a_thumbnail_page_is_not(tmp_path):
    """Only the first image of a multi-page TIFF or an animated PNG was graded, the rest dropped unseen."""
    from PIL import TiffImagePlugin

    first, second = Image.fromarray(knee_image(0)), Image.fromarray(knee_image(1))
    for suffix in ("tiff", "png"):
        path = save(first, tmp_path / f"two.{suffix}", save_all=True, append_images=[second])
        with pytest.raises(ImageReadError, match=f"more than one image in this {suffix.upper()[:4]} file"):
            read_image(path)
    thumbnail = Image.fromarray(knee_image(0)[::4, ::4])
    reduced = TiffImagePlugin.ImageFileDirectory_v2()
    reduced[254] = 1  # NewSubfileType: reduced-resolution version of another page
    thumbnail.encoderinfo = {"tiffinfo": reduced}
    path = save(first, tmp_path / "with_thumbnail.tiff", save_all=True, append_images=[thumbnail])
    np.testing.assert_array_equal(read_image(path), knee_image(0))


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is text, not an image\n" * 5, "not a recognised image"),
])
def test_bad_bytes_raise_one_error_with_path_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.path == str(path)
    assert reason in caught.value.reason
    assert "\n" not in str(caught.value)


def test_a_tiff_that_cannot_be_decoded_says_so_and_what_to_do(tmp_path):
    """A 64-bit float TIFF (numpy or MATLAB writes them) was "not a recognised image", although it is a TIFF."""
    import cv2

    path = tmp_path / "float64.tif"
    assert cv2.imwrite(str(path), knee_image().astype(np.float64))
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.reason == ("a TIFF that cannot be decoded (64-bit float samples, an unusual compression, or "
                                   "damaged?); save it as a 16-bit integer TIFF or PNG")


def test_a_jpeg_2000_that_declares_a_huge_image_is_refused_before_decoding():
    """A few hundred bytes whose header claims 20000 x 20000 pixels: refused by its size, not decoded."""
    data = io.BytesIO()
    Image.fromarray(knee_image(size=64)).save(data, format="JPEG2000", no_jp2=True)
    bomb = bytearray(data.getvalue())
    siz = bomb.index(b"\xff\x51")  # the codestream's image and tile size marker
    bomb[siz + 6:siz + 14] = bomb[siz + 22:siz + 30] = (20000).to_bytes(4, "big") * 2
    with pytest.raises(ImageReadError, match="image too large"):
        read_image(bytes(bomb), name="bomb.j2k")


def test_truncated_png_is_reported(tmp_path):
    data = io.BytesIO()
    Image.fromarray(knee_image(size=256)).save(data, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="truncated|corrupt|cannot decode"):
        read_image(path)


def test_decompression_bomb_is_refused(tmp_path):
    path = save(Image.new("1", (9000, 9000)), tmp_path / "bomb.png")
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageReadError, match="exceeds|too large"):
        read_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def test_bytes_input_uses_the_given_name(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(knee_image()).save(buffer, format="PNG")
    assert read_image(buffer.getvalue(), name="upload.png").shape == (64, 64)
    with pytest.raises(ImageReadError, match="upload.png"):
        read_image(b"junk" * 100, name="upload.png")


def test_corrupt_dicom_is_reported(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.path == str(path)


def test_a_truncated_compressed_dicom_is_one_line_on_the_command_line(tmp_path):
    """pydicom warned and logged what it met (an unterminated pixel sequence) beside klgrade's own error line."""
    source = write_dicom(tmp_path / "knee.dcm", knee_image(2).astype(np.uint16) * 16, "MONOCHROME2")
    encoded = compress_dicom(source, tmp_path / "rle.dcm", "RLELossless").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(encoded[:-200])
    result = run_cli("predict", str(truncated), "--format", "json")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {truncated}: DICOM file holds no image (no PixelData)"]


def test_arrays_in_memory_are_read_as_files_are():
    """The Python API's arrays: colour and extra axes of length 1 as a decoded file's would be, every other
    mistake one ImageReadError naming the array (an empty, complex or object array used to raise numpy's own
    errors, and a float64 beyond float32's range was graded as a blank image)."""
    grey = knee_image()
    for array in (grey, grey[None], grey[..., None], grey[None, None], np.stack([grey] * 3, -1),
                  np.dstack([grey] * 3 + [np.full_like(grey, 255)]), grey.astype(np.int64), grey.astype(np.uint16)):
        np.testing.assert_allclose(read_array(array), grey.astype(np.float32), atol=1e-4)
    bgr = np.stack([grey, grey // 2, grey // 4], -1)
    np.testing.assert_allclose(read_array(bgr), read_array(bgr[..., ::-1]))  # channel order does not matter
    for array, reason in [(np.zeros((0, 0)), "too small"), (np.zeros((8, 300)), "too small"),
                          (grey.ravel(), "expected a 2-D"), (np.stack([grey] * 5, -1), "expected a 2-D"),
                          (grey.astype(np.complex64), "complex64"), (grey.astype(object), "object"),
                          (np.where(grey > 100, np.nan, grey), "NaN"), (grey * 1e300, "beyond float32")]:
        with pytest.raises(ImageReadError, match=reason) as caught, warnings.catch_warnings():
            warnings.simplefilter("error")  # the refusal is the answer: no numpy overflow warning beside it
            read_array(array, name="scan.npy")
        assert str(caught.value).startswith("scan.npy: ")
    with pytest.raises(ImageReadError, match="exceeds the 0.001 MP limit"):
        read_array(grey, max_pixels=1000)
