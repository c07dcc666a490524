"""Image loading and CLIP preprocessing for LLaVA-1.5, matching transformers' CLIPImageProcessor.

The steps and their rounding follow the PIL backend of the installed transformers exactly:
RGB conversion (alpha composited onto white), optional pad-to-square with the mean colour
(original LLaVA "pad" mode / LlavaImageProcessor(do_pad=True)), PIL resize of the shortest edge
with int() truncation of the long edge, center crop with floor offsets (zero padding when the
image is smaller than the crop), rescale in float64 then cast to float32, normalize in float32.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .jsonfile import read_json_object

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    pass


# Refused up front, from the header, before any decode or resize: a 1x300000 image would become a
# 336x100800000 resize (tens of GB), and pad-to-square makes a long side squared. These bounds keep
# every intermediate image under ~100M pixels while admitting any photo and ordinary panoramas.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_SIDE = 10_000
MAX_ASPECT_RATIO = 20


def check_image_size(width: int, height: int, name: str) -> None:
    """ImageError for an image too large or too elongated to preprocess safely."""
    if width == 0 or height == 0:
        raise ImageError(f"{name}: image has zero size {width}x{height}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError(f"{name}: image is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1; "
                         "crop or pad it first")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageError(f"{name}: image is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE:,} pixels a side")


@dataclass
class ImageProcessorConfig:
    size: int = 336  # shortest edge after resize (or both sides when resize_square)
    crop_size: int = 336  # square center crop
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: int = 3  # PIL code; 3 = bicubic
    do_pad: bool = False  # pad to a square of the mean colour before resizing (original LLaVA "pad")
    do_center_crop: bool = True
    do_resize: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    resize_square: bool = False  # size given as {"height": s, "width": s}: resize to s x s, ignoring aspect

    def __post_init__(self):
        for name in ("size", "crop_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ImageError(f"ImageProcessorConfig.{name} must be a positive int, got {v!r}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise ImageError(f"ImageProcessorConfig.{name} must be 3 numbers, got {v!r}")
            setattr(self, name, tuple(float(x) for x in v))
        if any(s == 0 for s in self.image_std):
            raise ImageError(f"ImageProcessorConfig.image_std must be non-zero, got {self.image_std}")
        if self.resample not in (0, 1, 2, 3, 4, 5) or isinstance(self.resample, bool):
            raise ImageError(f"ImageProcessorConfig.resample must be a PIL filter code 0..5, got {self.resample!r}")
        if not isinstance(self.rescale_factor, (int, float)) or isinstance(self.rescale_factor, bool):
            raise ImageError(f"ImageProcessorConfig.rescale_factor must be a number, got {self.rescale_factor!r}")


def _side(value, field: str, where: str) -> tuple[int, bool]:
    """(pixels, is_square) for a CLIPImageProcessor size/crop_size entry: int, shortest_edge or height/width."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, False
    if isinstance(value, dict):
        if "shortest_edge" in value and isinstance(value["shortest_edge"], int):
            return value["shortest_edge"], False
        h, w = value.get("height"), value.get("width")
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise ImageError(f"{where}: {field} must be square for LLaVA, got height={h} width={w}")
            return h, True
    raise ImageError(f"{where}: {field} must be an int, {{'shortest_edge': N}} or {{'height','width'}}, got {value!r}")


def load_preprocessor_config(model_dir, image_size: int, pad: bool = False) -> ImageProcessorConfig:
    """Preprocessing settings from preprocessor_config.json, or CLIP defaults at image_size."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ImageError(f"image_size must be a positive int, got {image_size!r}")
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return ImageProcessorConfig(size=image_size, crop_size=image_size, do_pad=pad)
    raw = read_json_object(path, ImageError)

    def flag(key: str, default: bool) -> bool:
        v = raw.get(key, default)
        if not isinstance(v, bool):
            raise ImageError(f"{path}: {key} must be true/false, got {v!r}")
        return v

    def triple(key: str, default):
        v = raw.get(key, default)
        return [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    size, square = _side(raw.get("size", image_size), "size", str(path))
    crop, _ = _side(raw.get("crop_size", image_size), "crop_size", str(path))
    rescale = raw.get("rescale_factor", 1 / 255) if flag("do_rescale", True) else 1.0
    # Only LlavaImageProcessor's do_pad means pad-to-square; elsewhere it pads a batch to one size.
    llava_pad = str(raw.get("image_processor_type", "")).startswith("LlavaImageProcessor") and flag("do_pad", False)
    try:
        cfg = ImageProcessorConfig(
            size=size, crop_size=crop,
            image_mean=triple("image_mean", CLIP_MEAN), image_std=triple("image_std", CLIP_STD),
            resample=raw.get("resample", 3), do_pad=pad or llava_pad, do_center_crop=flag("do_center_crop", True),
            do_resize=flag("do_resize", True), do_normalize=flag("do_normalize", True), rescale_factor=rescale,
            resize_square=square)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    out = cfg.crop_size if cfg.do_center_crop else (cfg.size if cfg.do_resize and cfg.resize_square else None)
    if out != image_size:
        raise ImageError(f"{path}: preprocessing yields {out or 'variable-size'} images but the vision tower "
                         f"expects {image_size}x{image_size}")
    return cfg


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB like transformers' convert_to_rgb: transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(src) -> Image.Image:
    """An RGB PIL image from a path, raw bytes or a PIL image; any unusable input raises ValueError."""
    if isinstance(src, Image.Image):
        name, image = f"<PIL {src.mode} image>", src
        check_image_size(image.width, image.height, name)
        try:
            image.load()
        except Exception as e:
            raise ImageError(f"{name}: cannot decode image data ({e})") from e
    else:
        if isinstance(src, (str, Path)):
            name = str(src)
            if not Path(src).is_file():
                raise ImageError(f"{name}: image file not found")
            try:
                data = Path(src).read_bytes()
            except OSError as e:
                raise ImageError(f"{name}: cannot read image file ({e})") from e
        elif isinstance(src, (bytes, bytearray, memoryview)):
            name, data = f"<{len(src)} bytes>", bytes(src)
        else:
            raise ImageError(f"load_image: expected a path, bytes or PIL image, got {type(src).__name__}")
        image = _decode(data, name)
    check_image_size(image.width, image.height, name)
    return to_rgb(image)


def _decode(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ImageError(f"{name}: empty image data")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as fatal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_image_size(image.width, image.height, name)  # from the header: no pixel decoded yet
            image.load()  # force a full decode so truncated/corrupt data fails here, not later
            # Honour the EXIF orientation tag as transformers.image_utils.load_image does.
            return ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large, Pillow's decompression-bomb guard "
                         f"(PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}) refused it: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a recognised image format") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ... on bad data
        raise ImageError(f"{name}: corrupt or truncated image data ({type(e).__name__}: {e})") from e


def _resize_hw(width: int, height: int, size: int) -> tuple[int, int]:
    """(height, width) with the shortest edge = size; the long edge is truncated with int() like transformers."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """Center crop [C,H,W]; offsets floor toward the top-left, a too-small image is zero padded first."""
    _, h, w = x.shape
    top, left = (h - crop) // 2, (w - crop) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + crop, left:left + crop]
    # transformers pads to at least crop x crop with the extra row/column (odd difference) at the top/left.
    nh, nw = max(crop, h), max(crop, w)
    pad_top, pad_left = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas = x.new_zeros((x.shape[0], nh, nw))
    canvas[:, pad_top:pad_top + h, pad_left:pad_left + w] = x
    top, left = top + pad_top, left + pad_left
    return canvas[:, max(0, top):min(nh, top + crop), max(0, left):min(nw, left + crop)]


def preprocess(image, cfg: ImageProcessorConfig) -> torch.Tensor:
    """float32 pixel values [3, crop, crop] for one image (path, bytes or PIL image)."""
    if not isinstance(cfg, ImageProcessorConfig):
        raise ImageError(f"preprocess: cfg must be an ImageProcessorConfig, got {type(cfg).__name__}")
    image = load_image(image)
    if cfg.do_pad and image.width != image.height:
        # LLaVA's expand2square: centre on a mean-coloured square, floor offset for odd differences.
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in cfg.image_mean))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if cfg.do_resize:
        h, w = (cfg.size, cfg.size) if cfg.resize_square else _resize_hw(image.width, image.height, cfg.size)
        image = image.resize((w, h), resample=cfg.resample)
    # Channel-planar bytes straight from PIL give a contiguous [3, H, W] without a strided permute copy.
    planes = bytearray(b"".join(band.tobytes() for band in image.split()))
    x = torch.frombuffer(planes, dtype=torch.uint8).view(3, image.height, image.width)
    if cfg.do_center_crop:
        x = _center_crop(x, cfg.crop_size)
    # A channel only has 256 possible values: run transformers' exact arithmetic (rescale in float64,
    # cast to float32, normalize in float32) once per value and look pixels up. Bit-exact, and
    # one pass over the image instead of five.
    lut = (torch.arange(256, dtype=torch.float64) * cfg.rescale_factor).to(torch.float32).expand(3, 256)
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1)
        lut = (lut - mean) / std
    _, h, w = x.shape
    return torch.gather(lut.contiguous(), 1, x.reshape(3, h * w).long()).view(3, h, w)


def preprocess_batch(images, cfg: ImageProcessorConfig) -> torch.Tensor:
    """Stack preprocess() of each image into [N, 3, H, W]."""
    images = list(images)
    if not images:
        raise ImageError("preprocess_batch: no images given")
    out = [preprocess(im, cfg) for im in images]
    if any(t.shape != out[0].shape for t in out):
        raise ImageError(f"preprocess_batch: images came out with different shapes {[tuple(t.shape) for t in out]}; "
                         "enable do_center_crop")
    return torch.stack(out)
