"""models/image.py against transformers' CLIP / LLaVA image processors (PIL backend)."""

import io
import json
import random

import pytest
import torch
from PIL import Image, ImageFile

from models.image import (CLIP_MEAN, ImageProcessorConfig, load_image, load_preprocessor_config, preprocess,
                          preprocess_batch)

SIZES = [(37, 91), (500, 333), (1, 1), (2, 3), (3, 1), (31, 33), (64, 64)]
MODES = ["RGB", "L", "RGBA", "LA", "P", "P+transparency"]


def make_image(w, h, mode, seed=0):
    rng = random.Random(seed * 7919 + w * 31 + h)
    base = Image.frombytes("RGBA", (w, h), rng.randbytes(w * h * 4))
    if mode.startswith("P"):
        im = base.convert("RGB").convert("P")
        if mode == "P+transparency":
            im.info["transparency"] = im.getpixel((0, 0))
        return im
    return base.convert(mode)


def hf_processor(size, crop, do_pad=False):
    # The PIL backends are what CLIPImageProcessor / LlavaImageProcessor run without torchvision;
    # the torchvision backend resizes with a different kernel and is not a bit-exact reference.
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

    cls = LlavaImageProcessorPil if do_pad else CLIPImageProcessorPil
    kw = {"do_pad": True} if do_pad else {}
    return cls(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}, **kw)


def reference(proc, image):
    return torch.from_numpy(proc(image, return_tensors="np")["pixel_values"][0])


@pytest.mark.parametrize("side", [336, 32])
def test_matches_clip_image_processor(side):
    proc, cfg = hf_processor(side, side), ImageProcessorConfig(size=side, crop_size=side)
    cases = [(w, h, "RGB") for w, h in SIZES] + [(w, h, m) for w, h in [(37, 91), (2, 3)] for m in MODES[1:]]
    for w, h, mode in cases:
        im = make_image(w, h, mode)
        ours = preprocess(im, cfg)
        assert ours.dtype == torch.float32 and ours.shape == (3, side, side)
        # Same PIL resize and the same float64-rescale / float32-normalize order: bit-exact today.
        torch.testing.assert_close(ours, reference(proc, im), atol=1e-5, rtol=0, msg=f"{w}x{h} {mode}")


@pytest.mark.parametrize("side", [336, 32])
def test_pad_mode_matches_llava_image_processor(side):
    proc, cfg = hf_processor(side, side, do_pad=True), ImageProcessorConfig(size=side, crop_size=side, do_pad=True)
    cases = [(w, h, "RGB") for w, h in SIZES + [(10, 3), (3, 10)]] + [(37, 91, "RGBA"), (91, 37, "L")]
    for w, h, mode in cases:  # odd size differences check the floor placement
        im = make_image(w, h, mode, seed=1)
        torch.testing.assert_close(preprocess(im, cfg), reference(proc, im), atol=1e-5, rtol=0)


def test_pad_definition():
    # LLaVA expand2square: a 2x1 white image becomes a 2x2 square, mean-coloured row at the bottom
    # (offset (2-1)//2 = 0), and then nothing is resized or cropped away.
    cfg = ImageProcessorConfig(size=2, crop_size=2, do_pad=True, do_normalize=False, rescale_factor=1.0)
    out = preprocess(Image.new("RGB", (2, 1), (255, 255, 255)), cfg)
    fill = torch.tensor([int(m * 255) for m in CLIP_MEAN], dtype=torch.float32)
    assert torch.equal(out[:, 0], torch.full((3, 2), 255.0))
    assert torch.equal(out[:, 1], fill[:, None].expand(3, 2))


def test_crop_larger_than_resize_pads_with_zeros():
    proc = hf_processor(24, 32)
    cfg = ImageProcessorConfig(size=24, crop_size=32)
    for w, h in [(37, 91), (24, 24), (5, 3)]:
        im = make_image(w, h, "RGB")
        torch.testing.assert_close(preprocess(im, cfg), reference(proc, im), atol=1e-5, rtol=0)


def test_resize_rounding_truncates():
    # 336 * 91 / 37 = 826.37 -> 826 (int(), not round()); 336 * 500 / 333 = 504.50 -> 504.
    cfg = ImageProcessorConfig(size=336, crop_size=336, do_center_crop=False)
    assert preprocess(make_image(37, 91, "RGB"), cfg).shape == (3, 826, 336)
    assert preprocess(make_image(500, 333, "RGB"), cfg).shape == (3, 336, 504)


def test_batch_and_sources(tmp_path):
    cfg = ImageProcessorConfig(size=32, crop_size=32)
    im = make_image(40, 30, "RGB")
    path = tmp_path / "a.png"
    im.save(path)
    batch = preprocess_batch([im, path, str(path), path.read_bytes()], cfg)
    assert batch.shape == (4, 3, 32, 32)
    for i in range(1, 4):
        assert torch.equal(batch[0], batch[i])


def test_load_image_conversions(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white, as transformers does
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("L", (5, 7), 128).save(buf, format="PNG")
    out = load_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (5, 7) and out.getpixel((0, 0)) == (128, 128, 128)
    # EXIF orientation 6 (rotate 90 degrees) is applied, like transformers.image_utils.load_image.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4), "red").save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (4, 8)


# --- bad input -----------------------------------------------------------------------------

def png_bytes(w=64, h=48):
    buf = io.BytesIO()
    make_image(w, h, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(w=64, h=48):
    buf = io.BytesIO()
    make_image(w, h, "RGB").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def strict_pil(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="not found"):
        preprocess(str(tmp_path / "nope.png"), ImageProcessorConfig())


@pytest.mark.parametrize("data, match", [
    (png_bytes()[:200], "corrupt or truncated"),
    (jpeg_bytes()[: len(jpeg_bytes()) // 2], "corrupt or truncated"),
    (random.Random(0).randbytes(4096), "not a recognised image"),
    (b"", "empty"),
])
def test_bad_bytes(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        load_image(data)
    path = tmp_path / "bad.img"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="bad.img"):
        load_image(path)


def test_zero_size_and_wrong_type():
    with pytest.raises(ValueError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="expected a path"):
        load_image(12345)


@pytest.mark.parametrize("limit", [40 * 30 // 2 - 1, 40 * 30 - 1])  # error range and warning range
def test_decompression_bomb(monkeypatch, limit):
    data = png_bytes(40, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError, match="decompression-bomb"):
        load_image(data)


# --- preprocessor_config.json --------------------------------------------------------------

def test_config_defaults(tmp_path):
    cfg = load_preprocessor_config(tmp_path, 336)
    assert (cfg.size, cfg.crop_size, cfg.resample, cfg.do_pad) == (336, 336, 3, False)
    assert cfg.image_mean == CLIP_MEAN and load_preprocessor_config(tmp_path, 224, pad=True).do_pad


def test_config_from_llava_hf_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "CLIPImageProcessor", "image_std": [0.25, 0.25, 0.25], "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}, "do_pad": True}))
    cfg = load_preprocessor_config(tmp_path, 336)
    assert (cfg.size, cfg.crop_size, cfg.resample) == (336, 336, 2)
    assert cfg.image_mean == (0.5,) * 3 and cfg.image_std == (0.25,) * 3
    assert not cfg.do_pad  # CLIPImageProcessor's do_pad pads a batch, not to a square


def test_config_variants(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"size": 32, "crop_size": 32, "image_processor_type": "LlavaImageProcessor",
                                "do_pad": True}))
    cfg = load_preprocessor_config(tmp_path, 32)
    assert (cfg.size, cfg.crop_size, cfg.do_pad) == (32, 32, True)
    path.write_text(json.dumps({"size": {"height": 32, "width": 32}, "do_center_crop": False}))
    cfg = load_preprocessor_config(tmp_path, 32)
    assert cfg.resize_square and preprocess(make_image(50, 20, "RGB"), cfg).shape == (3, 32, 32)


@pytest.mark.parametrize("raw, match", [
    ("{broken", "not valid JSON"),
    (json.dumps({"crop_size": 224}), "expects 336x336"),
    (json.dumps({"size": {"height": 336, "width": 300}}), "square"),
    (json.dumps({"size": "big"}), "size"),
    (json.dumps({"image_mean": [0.5, 0.5]}), "image_mean"),
    (json.dumps({"image_std": [0, 1, 1]}), "image_std"),
    (json.dumps({"resample": 9}), "resample"),
    (json.dumps({"do_center_crop": "yes"}), "do_center_crop"),
    (json.dumps({"do_center_crop": False}), "variable-size"),
])
def test_config_errors(tmp_path, raw, match):
    (tmp_path / "preprocessor_config.json").write_text(raw)
    with pytest.raises(ValueError, match=match) as e:
        load_preprocessor_config(tmp_path, 336)
    assert "preprocessor_config.json" in str(e.value)


def test_config_dataclass_validation():
    with pytest.raises(ValueError, match="crop_size"):
        ImageProcessorConfig(crop_size=0)
    with pytest.raises(ValueError, match="image_size"):
        load_preprocessor_config(".", 0)
