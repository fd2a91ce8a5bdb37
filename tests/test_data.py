"""The image reader: orientation, bit depth, transparency, bad files, finding images.

Every image is generated here with PIL; nothing depends on the Keras backend."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from keras_sequencer import data
from keras_sequencer.data import DataError, ImageReadError, find_images, load_image, read_image


def _picture(width=32, height=48):
    """An upright picture with no symmetry: four coloured quadrants."""
    x = np.zeros((height, width, 3), np.uint8)
    x[: height // 2, : width // 2] = (255, 0, 0)
    x[: height // 2, width // 2 :] = (0, 255, 0)
    x[height // 2 :, : width // 2] = (0, 0, 255)
    x[height // 2 :, width // 2 :] = (255, 255, 0)
    return x


def _open_fds_on(path):
    fds = "/proc/self/fd"
    return sum(os.path.realpath(os.path.join(fds, f)) == os.path.realpath(path) for f in os.listdir(fds))


@pytest.mark.parametrize(
    "orientation, stored_as", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)]
)
def test_exif_orientation_is_applied(tmp_path, orientation, stored_as):
    upright = _picture()
    exif = Image.Exif()
    exif[0x0112] = orientation  # the camera was held sideways; the viewer rotates back
    path = tmp_path / "phone.jpg"
    Image.fromarray(upright).transpose(stored_as).save(path, quality=100, subsampling=0, exif=exif.tobytes())
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (32, 48)
    assert np.abs(np.asarray(image, np.float32) - upright).max() <= 8
    assert load_image(path, image_size=16).shape == (16, 16, 3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 40 * 30).round().astype(np.uint16).reshape(30, 40)
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray((values >> 8).astype(np.uint8)).save(tmp_path / "flat.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I")  # what the bug report saw
    deep = np.asarray(read_image(tmp_path / "deep.png"), np.int16)
    flat = np.asarray(read_image(tmp_path / "flat.png"), np.int16)
    assert deep.min() == 0 and deep.max() == 255
    assert np.abs(deep - flat).max() <= 1
    # Big-endian 16 bits and a 32-bit container of 16-bit data read the same.
    big_endian = read_image(Image.fromarray(values.astype(">u2")))
    as_int32 = read_image(Image.fromarray(values.astype(np.int32)))
    np.testing.assert_array_equal(np.asarray(big_endian), deep)
    np.testing.assert_array_equal(np.asarray(as_int32), deep)


def test_float_and_wide_integer_images():
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(read_image(Image.fromarray(ramp)))[..., 0], np.rint(ramp * 255))
    # Out of the conventional ranges: min..max stretched, not clipped.
    for wide in (ramp * 1000 - 500, (ramp * 1e6).astype(np.int32)):
        grey = np.asarray(read_image(Image.fromarray(wide)))[..., 0]
        assert grey.min() == 0 and grey.max() == 255 and np.all(np.diff(grey.ravel().astype(int)) >= 0)


def test_transparency_is_composited_over_white(tmp_path):
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (2, 0, 4, 2))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "palette.gif")
    for name in ("palette.png", "palette.gif"):
        x = np.asarray(read_image(tmp_path / name))
        assert (x[:, :2] == 255).all() and (x[:, 2:] == (255, 0, 0)).all()

    alpha = np.array([[0, 128, 255]], np.uint8)
    la = Image.merge("LA", [Image.new("L", (3, 1), 0), Image.fromarray(alpha)])
    rgba = Image.merge("RGBA", [Image.new("L", (3, 1), 0)] * 3 + [Image.fromarray(alpha)])
    rgba.save(tmp_path / "rgba.png")
    pa = Image.new("PA", (3, 1))
    pa.putpalette([0, 0, 0] * 256)
    pa.putalpha(Image.fromarray(alpha))
    for image in (la, rgba, tmp_path / "rgba.png", pa):
        x = np.asarray(read_image(image), np.int16)
        np.testing.assert_allclose(x[0, :, 0], [255, 127, 0], atol=1)
        assert (x == x[..., :1]).all()


def test_other_modes_become_rgb(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))
    cmyk.save(tmp_path / "cmyk.tif")
    for image in (cmyk, tmp_path / "cmyk.tif"):
        assert read_image(image).getpixel((0, 0)) == (0, 255, 255)  # cyan
    grey = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    x = np.asarray(read_image(grey))
    assert (x == np.asarray(grey)[..., None]).all()
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    assert np.asarray(read_image(bits)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    ycbcr = Image.new("RGB", (2, 2), (200, 100, 50)).convert("YCbCr")
    assert read_image(ycbcr).mode == "RGB"


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert read_image(tmp_path / "anim.gif").getpixel((0, 0)) == (255, 0, 0)


def test_open_image_is_read_and_left_open(tmp_path):
    Image.new("L", (3, 3), 9).save(tmp_path / "grey.png")
    with Image.open(tmp_path / "grey.png") as image:
        assert read_image(image).getpixel((0, 0)) == (9, 9, 9)
        assert image.getpixel((0, 0)) == 9  # the caller's image still works


def test_bad_files_raise_one_line(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(_picture(64, 64)).save(photo)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    fake = tmp_path / "notes.png"
    fake.write_text("not an image\n")
    for path in (truncated, fake, tmp_path / "missing.jpg"):
        with pytest.raises(ImageReadError) as caught:
            load_image(path)
        message = str(caught.value)
        assert message.startswith(f"cannot read image {path}: ") and "\n" not in message
        assert path.name != "truncated.jpg" or message.endswith("the file is truncated")
        assert isinstance(caught.value, DataError) and isinstance(caught.value, ValueError)
        if path.exists() and os.path.isdir("/proc/self/fd"):
            assert _open_fds_on(path) == 0
    if os.path.isdir("/proc/self/fd"):
        read_image(photo)
        assert _open_fds_on(photo) == 0


def test_pixel_limit_is_an_error_not_a_warning(tmp_path, monkeypatch, recwarn):
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    filters = list(warnings.filters)
    # Over the limit PIL warns; over twice the limit it raises. Both are refused.
    for limit in (150, 50):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageReadError, match=f"big.png: 200 pixels is over PIL's limit of {limit}"):
            read_image(tmp_path / "big.png")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters


def test_scan_image_folder_skips_and_counts_unreadable(tmp_path, monkeypatch):
    for name in ("cats", "dogs"):
        (tmp_path / name / "more").mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{index}.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "dogs" / "more" / "2.PNG")
    Image.new("RGB", (40, 40)).save(tmp_path / "cats" / "huge.png")
    (tmp_path / "dogs" / "readme.txt").write_text("hi")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 nothing")
    (tmp_path / "dogs" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "dogs" / ".cache").mkdir()
    (tmp_path / "dogs" / ".cache" / "x.jpg").write_bytes(b"")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    paths, labels, class_names, unreadable = data.scan_image_folder(str(tmp_path))
    assert class_names == ["cats", "dogs"]
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        "cats/0.jpg", "cats/1.jpg", "dogs/0.jpg", "dogs/1.jpg", "dogs/more/2.PNG"
    ]
    assert labels.tolist() == [0, 0, 1, 1, 1]
    assert sorted(os.path.relpath(p, tmp_path) for p in unreadable) == [
        "cats/huge.png", "dogs/broken.jpg", "dogs/readme.txt"
    ]
    assert data.class_counts(labels, class_names) == {"cats": 2, "dogs": 3}
    with pytest.raises(DataError, match="no such directory"):
        data.scan_image_folder(str(tmp_path / "missing"))


def test_find_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("a/z.jpg", "a/B.PNG", "a/b/c.webp", "a/.x.jpg", "a/.hidden/y.jpg", "a/notes.txt", "odd.dat"):
        (tmp_path / name).write_bytes(b"")
    root = str(tmp_path)

    def rel(paths):
        return [os.path.relpath(p, root) for p in paths]

    assert rel(find_images(os.path.join(root, "a"))) == ["a/B.PNG", "a/z.jpg", "a/b/c.webp"]
    # Given order kept, duplicates dropped; an explicit file is kept whatever its suffix.
    assert rel(find_images([tmp_path / "odd.dat", os.path.join(root, "a", "b"), os.path.join(root, "a")])) == [
        "odd.dat", "a/b/c.webp", "a/B.PNG", "a/z.jpg"
    ]
    assert rel(find_images([os.path.join(root, "**", "*.jpg")])) == ["a/z.jpg"]
    assert rel(find_images([os.path.join(root, "a", "*")])) == ["a/B.PNG", "a/b/c.webp", "a/z.jpg"]
    for missing, message in (
        ("nothing.jpg", "no such file or folder: "),
        ("empty", "no images"),
        ("*.gif", "no images match "),
    ):
        with pytest.raises(DataError, match=message) as caught:
            find_images([os.path.join(root, "a"), os.path.join(root, missing)])
        assert os.path.join(root, missing) in str(caught.value)


def test_load_image_sizes_and_interpolation(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(path)
    assert load_image(path, image_size=(24, 40)).shape == (24, 40, 3)
    x = load_image(path, image_size=32)
    assert x.dtype == np.float32 and x.shape == (32, 32, 3) and 0 <= x.min() and x.max() <= 255
    np.testing.assert_array_equal(load_image(path, image_size=(32, 32)), x)
    assert not np.array_equal(load_image(path, image_size=32, interpolation="nearest"), x)
    with pytest.raises(ValueError, match="interpolation"):
        load_image(path, interpolation="lanczos")


@pytest.mark.parametrize("size", [(24, 40), (40, 24), (36, 36)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_load_image_matches_timm_for_any_size(tmp_path, size, interpolation):
    transforms_factory = pytest.importorskip("timm.data.transforms_factory")
    for shape in ((60, 90, 3), (90, 61, 3)):
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))
        transform = transforms_factory.transforms_imagenet_eval(
            img_size=size, crop_pct=0.9, interpolation=interpolation, normalize=False
        )
        expected = transform(image).numpy().transpose(1, 2, 0)
        np.testing.assert_array_equal(load_image(image, size, crop_pct=0.9, interpolation=interpolation), expected)
