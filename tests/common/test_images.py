import numpy as np
import pytest
from PIL import Image

from ovseg_mine.images import ImageDecodeError, load_rgb


@pytest.fixture()
def jpeg(sample):
    return sorted((sample / "images").glob("*.jpg"))[0]


def test_decodes_real_jpeg(jpeg):
    array = load_rgb(jpeg)
    with Image.open(jpeg) as img:
        assert array.shape == (img.height, img.width, 3)
    assert array.dtype == np.uint8


def test_exif_rotation_is_applied(jpeg, tmp_path):
    with Image.open(jpeg) as img:
        rgb = img.convert("RGB")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        rgb.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
        width, height = rgb.size
    array = load_rgb(tmp_path / "rot.jpg")
    assert array.shape == (width, height, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_modes_become_rgb(jpeg, tmp_path, mode):
    with Image.open(jpeg) as img:
        converted = (
            img.convert(mode)
            if mode != "I;16"
            else Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
        )
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    converted.save(path)
    array = load_rgb(path)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    if mode == "I;16":
        with Image.open(jpeg) as img:
            np.testing.assert_array_equal(array[..., 0], np.asarray(img.convert("L")))


def test_bad_files_give_reasons(jpeg, tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_rgb(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_rgb(tmp_path / "empty.jpg")
    data = jpeg.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError, match="corrupt image"):
        load_rgb(tmp_path / "trunc.jpg")
    (tmp_path / "text.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_rgb(tmp_path / "text.jpg")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageDecodeError, match="too small"):
        load_rgb(tmp_path / "tiny.png")
    with pytest.raises(ImageDecodeError, match="too large"):
        load_rgb(jpeg, max_pixels=1000)


def test_transparent_pixels_are_composited_on_black(jpeg, tmp_path):
    with Image.open(jpeg) as img:
        rgba = img.convert("RGBA")
    pixels = np.asarray(rgba).copy()
    pixels[:10, :, :3] = 255  # stored colour white ...
    pixels[:10, :, 3] = 0  # ... but fully transparent
    pixels[10:20, :, 3] = 128  # half transparent
    Image.fromarray(pixels, "RGBA").save(tmp_path / "alpha.png")
    array = load_rgb(tmp_path / "alpha.png")
    assert (array[:10] == 0).all()
    expected = np.round(pixels[10:20, :, :3].astype(np.float64) * 128 / 255)
    assert np.abs(array[10:20].astype(np.float64) - expected).max() <= 1
    np.testing.assert_array_equal(array[20:], pixels[20:, :, :3])
