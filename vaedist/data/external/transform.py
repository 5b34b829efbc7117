"""One image in, one uint8 array [H, W, C] out: the single deterministic transform every external
source applies (TRANSFORM_SCHEME; the manifest records it), and the hash split.

For each image:
1. Decode with Pillow (GIF, animated WebP/TIFF: the first frame). Pillow's decompression-bomb guard
   stays on: an image over Image.MAX_IMAGE_PIXELS is refused (its warning zone, up to twice the limit,
   is refused too: a warning inside a Ray worker would go unseen).
2. Bring it to 8-bit grey (L) or RGB: 16-bit and 32-bit integer greys (I;16*, I) as round(v * 255 /
   65535) of v clipped to 0..65535; float greys (F) clipped to 0..255 and rounded; bilevel (1) as L;
   CMYK, YCbCr, LAB, HSV as RGB. Anything with alpha (RGBA, LA, PA, a palette or grey/RGB with a
   transparency key) is composited over data.background, per channel
   out = (c * a + bg * (255 - a) + 127) // 255, giving RGB; palettes without transparency become RGB.
   Native channels: 1 for the grey modes (1, L, I*, F, and LA on a grey background), else 3.
3. To data.channels: RGB to grey with Pillow's ITU-R 601-2 luma (L = R 299/1000 + G 587/1000 +
   B 114/1000); grey to RGB by repeating it.
4. To data.image_size [H, W]: if the image is not already H x W, scale it (Pillow's bilinear resize,
   antialiased when shrinking) by s = max(H / h, W / w), to max(W, round(w s)) x max(H, round(h s)),
   so that it covers H x W with the shorter side (for a square target) equal to the target, then
   crop the centre: left = (w' - W) // 2, top = (h' - H) // 2.
Arrays (.npy/.npz rows, npy entries of WebDataset shards) start at step 2 as L (2-d or 1 channel),
RGB (3) or RGBA (4); an array already of the target size and channels is used as it is.

The hash split: a datapoint is in the test split when the first 8 bytes of sha256(name), read as a
big-endian integer, are below test_fraction * 2**64; `name` is its relative path (images), shard
file name + '#' + key (webdataset) or array file name + '#' + row (arrays). So adding data never
moves existing datapoints between splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from vaedist.data.common import DataError

TRANSFORM_SCHEME = "pillow-composite-luma601-cover-bilinear-centrecrop-v1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GREY_MODES = {"1", "L", "I", "F"}
_NAMED_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


class BadImage(DataError):
    """One input that cannot be decoded (skippable with data.skip_bad_images); names it."""


def parse_background(value: str) -> tuple[int, int, int]:
    if value in _NAMED_BACKGROUNDS:
        return _NAMED_BACKGROUNDS[value]
    return tuple(int(value[i:i + 2], 16) for i in (1, 3, 5))  # "#rrggbb", checked by the config


@dataclass(frozen=True)
class ImageTransform:
    """What every image becomes: size (H, W) and channels (1 or 3); None keeps the image's own (and
    the prepare job then requires every image to agree)."""
    size: tuple[int, int] | None
    channels: int | None
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_config(cls, data_cfg) -> "ImageTransform":
        size = tuple(data_cfg.image_size) if data_cfg.image_size is not None else None
        return cls(size, data_cfg.channels, parse_background(data_cfg.background))

    def describe(self, shape: tuple[int, int, int]) -> dict:
        """The manifest's record of the transform, with the shape it produced."""
        return {"scheme": TRANSFORM_SCHEME, "image_size": list(shape[:2]), "channels": shape[2],
                "image_size_from": "config" if self.size else "images", "channels_from": "config" if self.channels
                else "images", "background": "#%02x%02x%02x" % self.background, "resample": "bilinear",
                "crop": "centre"}


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """[h, w, 4] uint8 over the background -> [h, w, 3] uint8, integer arithmetic (exact, portable)."""
    alpha = rgba[..., 3:4].astype(np.uint32)
    colour = rgba[..., :3].astype(np.uint32)
    bg = np.asarray(background, np.uint32)
    return ((colour * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def _to_8bit(image, background: tuple[int, int, int]):
    """(a Pillow image in mode L or RGB, native channels) from any mode (steps 2 of the docstring)."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I (32-bit)
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L"), 1
    if mode == "F":
        values = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
        return Image.fromarray(values.astype(np.uint8), "L"), 1
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        grey = mode in ("LA", "La") or (mode == "L")
        rgb = _composite(np.asarray(image.convert("RGBA")), background)
        if grey and len(set(background)) == 1:  # grey over grey stays grey: R = G = B
            return Image.fromarray(np.ascontiguousarray(rgb[..., 0]), "L"), 1
        return Image.fromarray(rgb, "RGB"), 3
    if mode in _GREY_MODES:
        return (image if mode == "L" else image.convert("L")), 1
    return (image if mode == "RGB" else image.convert("RGB")), 3


def _finish(image, native_channels: int, tf: ImageTransform) -> np.ndarray:
    """Steps 3 and 4: channels, then size; [H, W, C] uint8."""
    from PIL import Image

    channels = tf.channels or native_channels
    if channels != native_channels:
        image = image.convert("L" if channels == 1 else "RGB")
    if tf.size is not None:
        height, width = tf.size
        w, h = image.size
        if (h, w) != (height, width):
            scale = max(height / h, width / w)
            new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top = (new_w - width) // 2, (new_h - height) // 2
            image = image.crop((left, top, left + width, top + height))
    out = np.asarray(image, dtype=np.uint8)
    return out.reshape(out.shape[0], out.shape[1], channels)


_guarded = threading.local()


@contextlib.contextmanager
def bomb_guard():
    """Pillow's decompression-bomb warning (an image over MAX_IMAGE_PIXELS but under twice it) raised
    as an error, for a run of decode_image calls in this thread: a decode task enters it once, not
    once per image (catch_warnings took ~7 of a 28x28 PNG's ~67 us). decode_image enters it itself
    when called outside one."""
    from PIL import Image

    if getattr(_guarded, "active", False):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        _guarded.active = True
        try:
            yield
        finally:
            _guarded.active = False


def decode_image(data: bytes, name: str, tf: ImageTransform) -> np.ndarray:
    """The encoded image `data` (named `name` in errors) as uint8 [H, W, C]; BadImage if Pillow
    cannot decode it, it is truncated, or it is over Pillow's pixel limit."""
    from PIL import Image

    try:
        with bomb_guard(), Image.open(io.BytesIO(data)) as image:
            image.seek(0)  # GIF, animated WebP/TIFF: the first frame
            image.load()
            image8, native = _to_8bit(image, tf.background)
            return _finish(image8, native, tf)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{name}: over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
                       f"(PIL.Image.MAX_IMAGE_PIXELS) ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name}: not an image Pillow can read (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def convert_array(array: np.ndarray, name: str, tf: ImageTransform) -> np.ndarray:
    """One uint8 array image [h, w] or [h, w, 1|3|4] as [H, W, C] by the same steps 2-4."""
    from PIL import Image

    if array.dtype != np.uint8:
        raise BadImage(f"{name}: dtype {array.dtype}, expected uint8 images")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise BadImage(f"{name}: shape {array.shape}, expected an image [H, W] or [H, W, C] with C 1, 3 or 4")
    array = np.ascontiguousarray(array)
    if array.ndim == 3 and array.shape[2] == 4:
        image, native = _to_8bit(Image.fromarray(array, "RGBA"), tf.background)
        return _finish(image, native, tf)
    native = 1 if array.ndim == 2 else 3
    if tf.channels in (None, native) and (tf.size is None or tuple(array.shape[:2]) == tuple(tf.size)):
        return array.reshape(array.shape[0], array.shape[1], native)  # already what is asked: no Pillow
    return _finish(Image.fromarray(array, "L" if native == 1 else "RGB"), native, tf)


def is_test(names: list[str], test_fraction: float) -> np.ndarray:
    """The hash split (module docstring): bool per name, True for the test split."""
    threshold = int(test_fraction * 2 ** 64)
    return np.fromiter((int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") < threshold for n in names),
                       dtype=bool, count=len(names))
