"""Images to uint8 ``(C, H, W)`` tensors with the model's number of channels.

Encoded files are decoded by TorchCodec (JPEG, PNG, WebP, GIF, AVIF; CMYK JPEGs and 16-bit PNGs included; the
first frame of an animation), with PIL for what it does not read (BMP, TIFF...) and for files it refuses. Grayscale
images are repeated to three channels, colour images converted to one channel with PIL's luma weights for a
one-channel model (JPEG and PNG decoders make gray themselves), alpha dropped (as PIL's ``convert("RGB")``), 16-bit
values scaled to 8 bits. Dataset items may be PIL images, numpy arrays or tensors, ``(C, H, W)`` or ``(H, W, C)``.

Example:
    >>> import io, torch
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("L", (5, 4), color=200).save(buffer, "PNG")
    >>> image = decode(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), channels=3)
    >>> image.dtype, tuple(image.shape), image[:, 0, 0].tolist()
    (torch.uint8, (3, 4, 5), [200, 200, 200])
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fxfeat.errors import DataSourceError, MissingDependencyError

__all__ = ["decode", "check_decoder", "image_tensor", "pil_image", "to_channels"]

_MODES = {1: "GRAY", 3: "RGB", 4: "RGB_ALPHA"}
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_GRAY_NATIVELY = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: their decoders make gray as torchvision's did


def decode(encoded: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Decode an image file's bytes (a uint8 tensor) into a uint8 ``(channels, H, W)`` tensor.

    Raises:
        ValueError: the bytes are not an image either decoder reads, or none at all (the message says why).
    """
    if encoded.numel() == 0:
        raise ValueError("empty file")
    mode = _MODES.get(channels, "UNCHANGED")
    if mode == "GRAY" and not bytes(encoded[:8].tolist()).startswith(_GRAY_NATIVELY):
        mode = "RGB"  # TorchCodec's own conversion weighs the colours otherwise than PIL's luma (to_channels)
    try:
        image = check_decoder()(encoded, mode=mode, output_dtype="auto")
    except (RuntimeError, ValueError):  # a format TorchCodec does not decode, or a damaged file: PIL decides
        return image_tensor(pil_image(encoded), channels)
    return to_channels(image[0] if image.dim() == 4 else image, channels)  # an animation: its first frame, as PIL


@functools.cache
def check_decoder() -> Callable[..., torch.Tensor]:
    """TorchCodec's ``decode_image``, loaded once per process: call it in the main process before the DataLoader
    workers start (they then share it, and a missing TorchCodec stops the run instead of failing every image).

    Raises:
        MissingDependencyError: TorchCodec is not installed, or not the build for this torch.
    """
    try:
        from torchcodec.decoders import decode_image
    except (ImportError, OSError, RuntimeError) as error:
        raise MissingDependencyError(
            f"fxfeat.extract decodes images with TorchCodec, which cannot be loaded here ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}).",
            hint="pip install 'fxfeat[extract]', which installs torchcodec; its release must match your torch's "
            "(torchcodec 0.17 for torch 2.14).") from None
    return decode_image


def pil_image(encoded: torch.Tensor):
    """The PIL image of an image file's bytes, fully loaded (a damaged file fails here, not later)."""
    from PIL import Image

    if encoded.numel() == 0:
        raise ValueError("empty file")
    try:
        image = Image.open(io.BytesIO(encoded.numpy().tobytes()))
        image.load()
    except Exception as error:
        raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from None
    return image


def image_tensor(image: Any, channels: int = 3) -> torch.Tensor:
    """A PIL image, numpy array or tensor as a uint8 ``(channels, H, W)`` tensor. Arrays and tensors are
    ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with 1, 2, 3 or 4 channels; floating ones hold values in [0, 1]."""
    if hasattr(image, "getbands"):  # PIL
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64) / 65535.0
            return to_channels(torch.from_numpy(_to_uint8(array)).unsqueeze(0), channels)
        mode = _PIL_MODES.get(channels, "RGB")
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
        image = image if channels in (1, 3) and image.mode == mode else image.convert(mode)
        return torch.from_numpy(np.array(image)).reshape(image.height, image.width, -1).permute(2, 0, 1).contiguous()
    tensor = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3:
        raise ValueError(f"an image array has 2 or 3 dimensions, not shape {tuple(tensor.shape)}")
    if tensor.shape[0] not in (1, 2, 3, 4) and tensor.shape[-1] in (1, 2, 3, 4):
        tensor = tensor.permute(2, 0, 1)  # (H, W, C)
    if tensor.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"an image array has 1 to 4 channels first or last, not shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint16 or (tensor.dtype in (torch.int32, torch.int64) and tensor.max() > 255):
        tensor = torch.from_numpy(_to_uint8(tensor.double().numpy() / 65535.0))
    elif tensor.is_floating_point():
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
            raise DataSourceError(
                f"a dataset item is a float image with values from {tensor.min():.3g} to {tensor.max():.3g}, not "
                "in [0, 1]: it looks preprocessed already, and fxfeat would preprocess it again.",
                hint="give fxfeat the dataset without its transform (fxfeat applies the model's own), or pass "
                "transform=lambda image: image to use the items as they are.")
        tensor = torch.from_numpy(_to_uint8(tensor.double().numpy()))
    return to_channels(tensor.to(torch.uint8).contiguous(), channels)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """A ``(C, H, W)`` image with ``channels`` channels: gray repeated, alpha dropped, colour to luma, and 16-bit
    values scaled to 8 bits."""
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)
    if image.shape[0] in (2, 4) and channels != image.shape[0]:
        image = image[:-1]  # alpha
    count = image.shape[0]
    if count == channels:
        return image
    if count == 1:
        return image.expand(channels, -1, -1).contiguous()
    if channels == 1 and count == 3:  # PIL's "L": L = R * 299/1000 + G * 587/1000 + B * 114/1000
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(3, 1, 1)
        return ((image.to(torch.int32) * weights).sum(0, keepdim=True) + 32768).div(
            65536, rounding_mode="floor").to(torch.uint8)
    if channels == 4 and count == 3:
        return torch.cat([image, torch.full_like(image[:1], 255)])
    raise ValueError(f"cannot convert a {count}-channel image to the model's {channels} channels")
