"""Image verification: header reasons without decoding, full decode with a cache, real odd files."""
import json
import os
import shutil

import pytest
from PIL import Image

from pillsnap_dali.benchmarks.scan import tiny_png
from pillsnap_dali.data.verify import Verifier, VerifySettings
from pillsnap_dali.imageio import (check_full, check_header, open_rgb, pixel_problem, read_encoded,
                                   read_encoded_upright)

from corpus import header_verdicts, png_claiming


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(tiny_png(16))
    f = {"good": good, "empty": tmp_path / "empty.png", "text": tmp_path / "notes.png",
         "gif": tmp_path / "anim.png", "bomb": tmp_path / "bomb.png", "trunc": tmp_path / "trunc.png",
         "corrupt": tmp_path / "corrupt.png", "jpeg": tmp_path / "photo.jpg"}
    f["empty"].write_bytes(b"")
    f["text"].write_text("not an image at all", encoding="utf-8")
    Image.new("RGB", (8, 8), "red").save(f["gif"], format="GIF")
    f["bomb"].write_bytes(png_claiming(20000, 20000))
    data = bytearray(tiny_png(64, (10, 200, 30)))
    f["trunc"].write_bytes(bytes(data[: len(data) // 2]))
    i = data.index(b"IDAT") + 8          # corrupt the compressed pixels, keep IEND: only a decode sees it
    data[i:i + 8] = b"\xff" * 8
    f["corrupt"].write_bytes(bytes(data))
    Image.new("RGB", (8, 8), "blue").save(f["jpeg"], format="JPEG")
    return f


def test_header_reasons(files):
    got = {k: check_header(str(p), 40_000_000) for k, p in files.items()}
    assert got == {"good": None, "empty": "empty file", "text": "not an image", "gif": "unsupported format: GIF",
                   "bomb": "too many pixels: 400000000 > max_pixels 40000000", "trunc": "truncated png",
                   "corrupt": None, "jpeg": None}
    assert check_header(str(files["good"].with_name("nope.png")), 100) == "missing file"
    assert check_header(str(files["good"]), 255) == "too many pixels: 16x16 = 256 > max_pixels 255"


def test_one_size_reason_for_verify_loaders_and_open_rgb(tmp_path):
    """imageio's check_header (verify), read_encoded (the DALI loaders), read_encoded_upright (detection) and
    open_rgb (pil, predict, prepare) share pixel_problem / bomb_problem: the same reason for the same file."""

    over, bomb, sliver = tmp_path / "over.png", tmp_path / "bomb.png", tmp_path / "sliver.png"
    Image.new("RGB", (16, 10), "red").save(over)
    bomb.write_bytes(png_claiming(20000, 20000))
    Image.new("RGB", (20000, 2), "red").save(sliver)  # 40 k pixels; eval crop mode would resize it to 1.9 G
    for path, max_pixels, want in ((over, 100, "too many pixels: 16x10 = 160 > max_pixels 100"),
                                   (bomb, 40_000_000, "too many pixels: 400000000 > max_pixels 40000000"),
                                   (sliver, 40_000_000, "extreme aspect ratio: 20000x2 (more than 64:1)")):
        assert check_header(str(path), max_pixels) == want
        assert read_encoded(str(path), max_pixels) == (None, want)
        assert read_encoded_upright(str(path), max_pixels) == (None, want, None)
        with pytest.raises(ValueError) as err:
            open_rgb(str(path), max_pixels)
        assert str(err.value) == want
    assert read_encoded_upright(str(over), 160)[1:] == (None, (10, 16))  # at the limit: accepted
    assert pixel_problem(0, 5, 100) == "invalid size 0x5" and pixel_problem(-1, 5, 100) == "invalid size -1x5"
    assert pixel_problem(10, 10, 100) is None


def test_full_decodes_and_caches(files, tmp_path):
    assert check_full(str(files["corrupt"]), 40_000_000).startswith("decode failed: ")
    cache = tmp_path / "cache.json"
    paths = [str(p) for p in files.values()]
    v = Verifier(VerifySettings("full", 40_000_000, workers=2, cache_path=cache))
    bad = v.bad(paths)
    assert set(bad) == {str(files[k]) for k in ("empty", "text", "gif", "bomb", "trunc", "corrupt")}
    assert v.decoded == len(paths)
    v.save()
    again = Verifier(VerifySettings("full", 40_000_000, workers=2, cache_path=cache))
    assert again.bad(paths) == bad and again.decoded == 0          # rerun: nothing decoded
    shutil.copyfile(files["good"], files["corrupt"])                # the bad file is fixed: checked again
    os.utime(files["corrupt"], ns=(1, 1))
    third = Verifier(VerifySettings("full", 40_000_000, workers=1, cache_path=cache))
    assert str(files["corrupt"]) not in third.bad(paths) and third.decoded == 1
    third.save()
    data = json.loads(cache.read_text(encoding="utf-8"))
    cache.write_text(json.dumps({**data, "version": 1}), encoding="utf-8")  # older reason texts: not served
    fourth = Verifier(VerifySettings("full", 40_000_000, workers=1, cache_path=cache))
    fourth.bad(paths)
    assert fourth.decoded == len(paths)


def test_none_mode_checks_nothing(files):
    assert Verifier(VerifySettings("none")).bad([str(p) for p in files.values()]) == {}
    with pytest.raises(ValueError, match="verify mode"):
        Verifier(VerifySettings("fast"))


def test_odd_images_get_a_verdict_never_a_crash(odd_corpus, odd_images):
    """The generated corpus gets exactly the header verdicts it was made for; it and the shared real images
    (when present): full never accepts what the header rejects, and what full accepts really decodes."""
    for name, want in header_verdicts().items():
        got = check_header(str(odd_corpus[name]), 40_000_000)
        assert got is None if want is None else (got or "").startswith(want), (name, got)
    paths = [str(p) for p in odd_images]
    v = Verifier(VerifySettings("full", 40_000_000, workers=2))
    bad = v.bad(paths)
    header_bad = {p for p in paths if check_header(p, 40_000_000)}
    assert header_bad <= set(bad)                       # full never accepts what the header rejects
    assert bad[str(odd_corpus["notes.txt"])] == "not an image"
    for name in ("png_bad_pixel_data.png", "jpeg_cut_in_scan.jpg", "jpeg_cut_before_eoi.jpg"):
        assert bad[str(odd_corpus[name])].startswith("decode failed"), name   # only a decode sees these
    assert 0 < len(bad) < len(paths) / 2                # most are fine, some are not
    for p in set(paths) - set(bad):                     # what passes really decodes
        with Image.open(p) as im:
            im.load()


def test_the_full_cache_re_verifies_a_file_changed_in_place_or_resized(tmp_path):
    """The cache key is path + size + mtime: a file broken in place (same size, new time) and a file replaced
    by another of a new size under its old time are decoded again, each with its new verdict."""
    data = bytearray(tiny_png(64, (10, 200, 30)))
    same_size, resized = tmp_path / "in_place.png", tmp_path / "resized.png"
    for p in (same_size, resized):
        p.write_bytes(bytes(data))
        os.utime(p, ns=(10**18, 10**18))
    cache = tmp_path / "cache.json"
    first = Verifier(VerifySettings("full", 40_000_000, workers=1, cache_path=cache))
    assert first.bad([str(same_size), str(resized)]) == {} and first.decoded == 2
    first.save()
    i = data.index(b"IDAT") + 8
    data[i:i + 8] = b"\xff" * 8  # the same number of bytes, the pixels broken
    same_size.write_bytes(bytes(data))
    os.utime(same_size, ns=(10**18 + 1, 10**18 + 1))
    resized.write_bytes(b"not an image at all")
    os.utime(resized, ns=(10**18, 10**18))  # the old time: only the size tells
    again = Verifier(VerifySettings("full", 40_000_000, workers=1, cache_path=cache))
    bad = again.bad([str(same_size), str(resized)])
    assert again.decoded == 2
    assert bad[str(same_size)].startswith("decode failed: ") and bad[str(resized)] == "not an image"
    again.save()
    third = Verifier(VerifySettings("full", 40_000_000, workers=1, cache_path=cache))
    assert third.bad([str(same_size), str(resized)]) == bad and third.decoded == 0  # unchanged: served
