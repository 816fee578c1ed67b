"""Image grids as PNG files."""
import math
import torch
from PIL import Image

from tract_repro.common.files import write_atomic


QUANTISERS = ("round", "edm")


def to_uint8(x, quantiser="round"):
    """[−1, 1] floats → uint8, clipped to [0, 255]: the one 8-bit quantiser of grids, sample dumps and every FID.

    ``'round'``: round(127.5·(x + 1)) (PD, TRACT, clean-fid and our grids); ``'edm'``: ⌊127.5·x + 128⌋ (EDM's
    generate.py writes (x·127.5 + 128).clip(0, 255) as uint8, i.e. truncation).
    """
    if quantiser == "edm":
        return torch.floor(127.5 * x.double() + 128).clamp(0, 255).to(torch.uint8)
    if quantiser != "round":
        raise ValueError(f"quantiser {quantiser!r}: choose one of {QUANTISERS}")
    return torch.round(127.5 * (x.double() + 1.0)).clamp(0, 255).to(torch.uint8)


def save_grid(x, path, ncol=None, scale=1, pad=1):
    """Tile images (N, C, H, W) in [−1, 1] into one PNG, each upscaled ``scale``× (nearest)."""
    array = grid_image(x, ncol, scale, pad).permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return write_atomic(path, lambda f: image.save(f, format="PNG"))


def grid_image(x, ncol=None, scale=1, pad=1):
    """The picture :func:`save_grid` writes, as a uint8 tensor (C, H, W): images (N, C, H, W) in [−1, 1]
    tiled ``ncol`` to a row (default √N), each upscaled ``scale``× (nearest), on white with ``pad`` pixels between."""
    n, c, h, w = x.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    img = to_uint8(x)
    if scale > 1:
        img = img.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    canvas = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img[k]
    return canvas


def save_captioned_grid(x, captions, path, ncol=None, scale=1, lines=3):
    """Tile images (N, C, H, W) in [−1, 1] into one PNG with each image's caption written under it (PIL's default
    font, wrapped to the image's width, at most ``lines`` lines, the last cut with "...")."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    n, c, h, w = x.shape
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    font = ImageFont.load_default()
    char_w = max(1, int(font.getlength("x")))
    line_h = int(sum(font.getmetrics())) + 2
    cell_w, pad = w * scale, 4
    text_h = lines * line_h + pad
    sheet = Image.new("RGB", (ncol * (cell_w + pad) + pad, nrow * (h * scale + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    pictures = to_uint8(x)
    for k in range(n):
        r, q = divmod(k, ncol)
        left, top = pad + q * (cell_w + pad), pad + r * (h * scale + text_h + pad)
        array = pictures[k].permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[:, :, 0] if c == 1 else array).convert("RGB")
        sheet.paste(picture.resize((cell_w, h * scale), Image.NEAREST), (left, top))
        wrapped = textwrap.wrap(str(captions[k] or ""), width=max(4, cell_w // char_w)) or [""]
        if len(wrapped) > lines:
            wrapped = wrapped[:lines - 1] + [wrapped[lines - 1][:-3] + "..."]
        for j, line in enumerate(wrapped):
            draw.text((left, top + h * scale + 2 + j * line_h), line, fill="black", font=font)
    return write_atomic(path, lambda f: sheet.save(f, format="PNG"))
