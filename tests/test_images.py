"""Photos are decoded as a person sees them, whatever their mode, bit depth, palette, transparency,
orientation or colour profile; what cannot be decoded faithfully is an error naming the file;
concept names from any folder name work and never steer a path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from sbora_diffusion.concept.config import ConceptError, image_files, load_concept, open_rgb, safe_name

RED, BLUE, WHITE = (220, 20, 20), (20, 20, 220), (255, 255, 255)


def two_halves(w: int = 40, h: int = 20) -> Image.Image:
    """Red left half, blue right half: any rotation or flip shows."""
    im = Image.new("RGB", (w, h), BLUE)
    im.paste(RED, (0, 0, w // 2, h))
    return im


def close(pixel, colour, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


@pytest.mark.parametrize("orientation, top_left, size", [
    (1, RED, (40, 20)),    # as stored
    (3, BLUE, (40, 20)),   # rotated 180
    (6, RED, (20, 40)),    # rotated 90 clockwise on display: the left half goes to the top
    (8, BLUE, (20, 40)),   # rotated 90 counter-clockwise: the right half goes to the top
    (2, BLUE, (40, 20)),   # mirrored
])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_orientation_tag_of_phone_photos_is_applied(orientation, top_left, size, fmt, tmp_path):
    path = tmp_path / f"photo.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    two_halves().save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    im = open_rgb(path)
    assert im.size == size and im.mode == "RGB"
    assert close(im.getpixel((2, 2)), top_left)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    a = np.full((8, 8), 40000, dtype=np.uint16)
    a[:, :4] = 1000
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    px = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert px[0, 6].tolist() == [round(40000 / 257)] * 3 and px[0, 0].tolist() == [round(1000 / 257)] * 3  # 156, 4: not 255
    big = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), "I")
    big.save(tmp_path / "i32.tif")
    with pytest.raises(ConceptError, match="i32.tif.*no known display range"):
        open_rgb(tmp_path / "i32.tif")


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    rgba.save(tmp_path / "a.png")
    im = open_rgb(tmp_path / "a.png")
    assert im.getpixel((0, 0)) == WHITE and close(im.getpixel((1, 1)), (255, 127, 127), tol=2)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png", transparency=0)
    im = open_rgb(tmp_path / "p.png")
    assert im.getpixel((0, 0)) == WHITE and im.getpixel((1, 1)) == (255, 0, 0)  # not the black of the transparent entry
    la = Image.new("LA", (2, 2), (10, 0))
    la.save(tmp_path / "la.png")
    assert open_rgb(tmp_path / "la.png").getpixel((0, 0)) == WHITE


def test_other_modes_and_profiles(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert close(open_rgb(tmp_path / "cmyk.jpg").getpixel((1, 1)), (255, 0, 0), tol=16)
    Image.new("1", (4, 4), 1).save(tmp_path / "bw.png")
    assert open_rgb(tmp_path / "bw.png").getpixel((0, 0)) == WHITE
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    two_halves().save(tmp_path / "tagged.png", icc_profile=srgb)
    assert close(open_rgb(tmp_path / "tagged.png").getpixel((2, 2)), RED, tol=3)  # an sRGB tag changes nothing
    lab = Image.new("LAB", (4, 4), (255, 128, 128))  # L=100% (stored as 255), a=b=0: white
    lab.save(tmp_path / "lab.tif")
    assert close(open_rgb(tmp_path / "lab.tif").getpixel((0, 0)), WHITE, tol=6)


def test_what_cannot_be_decoded_is_named(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F").save(tmp_path / "hdr.tif")
    with pytest.raises(ConceptError, match="hdr.tif.*floating-point"):
        open_rgb(tmp_path / "hdr.tif")
    buf = io.BytesIO()
    two_halves(200, 200).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:300])
    with pytest.raises(ConceptError, match="cut.jpg"):
        open_rgb(tmp_path / "cut.jpg")
    folder = tmp_path / "phone"
    folder.mkdir()
    two_halves().save(folder / "a.jpg")
    (folder / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(ConceptError, match="IMG_0001.HEIC.*HEIC photos cannot be decoded here; convert them"):
        image_files(folder)
    (folder / "IMG_0001.HEIC").unlink()
    (folder / "notes.txt").write_text("not a photo")
    assert [p.name for p in image_files(folder)] == ["a.jpg"]


@pytest.mark.parametrize("name", ["my dog", "Hündchen", "狗", "train", "a.b", "dog 1", "x" * 80, "..", "-"])
def test_any_folder_name_gives_a_safe_distinct_internal_name(name, tmp_path):
    key = safe_name(name)
    assert key and all(c.isalnum() and c.isascii() or c in "_-" for c in key) and len(key) <= 49
    assert key not in ("train", "..") and "/" not in key
    assert safe_name(name + "!") != key  # different names stay apart
    if name not in ("..",):
        folder = tmp_path / name
        folder.mkdir()
        two_halves().save(folder / "a.png")
        concept = load_concept(folder)
        assert concept.name == name and concept.key == key and concept.token == f"<{key.lower()}1>"
    assert safe_name("robot") == "robot"  # plain names are kept as they are
