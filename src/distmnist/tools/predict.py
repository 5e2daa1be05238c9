"""Classify real image files with a trained model.pt.

    distmnist predict --model runs/fashion/model.pt shirt.jpg boot.png
    distmnist predict --model runs/ddp-fashion/model.pt --json digits/*.png
    python -m distmnist.predict --model runs/ddp-fashion/model.pt --classes mnist seven.png

Each image (PNG, JPEG, ... any size, colour or grey, with or without alpha, light or dark background) is made to
look like a data set image by :func:`to_model_input`, then classified; one line per image:
``path: class <index> (<name>) p=<probability>``. Class names come from ``--classes`` or from the
``config.yaml`` of the run (``--model`` takes a run dir, its model.pt or any of its checkpoints, as ``evaluate``
does); without either only the index is printed.

Images of more than 4096x4096 pixels (16.8 Mpx) are refused from their header, before anything is decoded: a
PNG of a few hundred kB can hold 13000x13000 pixels, GBs once decoded.

Preprocessing rules (:func:`to_model_input`):

1. Orientation from EXIF; 16-bit images scaled to 8 bits; palette images expanded. A picture with a side over
   1024 px is first reduced by a whole factor to at most 1024 px (box filter; a cut-out premultiplied by its
   alpha), so that the float arrays below stay small; the 28x28 frame is made from far fewer pixels anyway.
2. Transparency: transparent pixels are background. The image is composited onto black or white:
   if the anti-aliased rim of the opaque part (opaque pixels that touch transparent ones) is clearly darker
   than its inside (by more than 32 grey levels) the cut-out came from a dark background -> black; clearly
   lighter -> white; otherwise the colour that contrasts with the opaque part (white if its alpha-weighted mean
   grey is below 128, else black). Opaque images are unaffected.
3. Greyscale: ITU-R 601 luma (PIL's ``convert("L")``).
4. Polarity: the background is light when the median of the outermost rows and columns is above the middle of
   the image's grey range, ``(min + max) / 2``; then the image is inverted, so the background is dark and the
   ink bright, as in MNIST and Fashion-MNIST. Less than 16 grey levels between min and max: a blank image,
   refused.
5. Background level: the median of the border pixels on the background side of that middle (inverted with the
   image: a dim photo's range is not symmetric about 127.5); it becomes 0.
6. A 28x28 image is taken to be framed already (an MNIST/Fashion-MNIST image saved as a file): grey levels are
   mapped ``bg..255 -> 0..255`` and nothing else changes (a dark-background data set image comes through bit for
   bit). Re-framing them would hurt: Fashion-MNIST items fill the 28x28 frame.
7. Any other size is framed the way the data set was made:

   * levels: ``bg..max -> 0..1``, and grey levels within the background's noise (90th minus 50th percentile of
     the background border pixels) are set to 0;
   * crop to the bounding box of the ink: pixels above 0.3 of the range (faint noise and shadows ignored);
   * scale (antialiased, Lanczos) so the longer side is 20 px for MNIST (the box of the NIST digits) or
     28 px for Fashion-MNIST (its items fill the frame), keeping the aspect ratio;
   * paste into a black 28x28 canvas: MNIST centred by the centre of mass (as MNIST was made), Fashion-MNIST
     centred by the bounding box (as Fashion-MNIST was made). Without a known data set: MNIST's rule.

8. Values ``uint8 / 255`` as float32, shape [1, 1, 28, 28], like the training data (no normalisation).

The grey levels are float32 arrays throughout.

Exit status: 0 when every image was classified, 2 when any could not be (each one gets a line
``distmnist: error: <path>: <reason>`` on stderr and the others are still classified), 2 for a bad --model.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps

from distmnist.core import data
from distmnist.core.errors import USAGE_EXIT, DistMnistError, report_errors

SIZE = 28
# class names of the real data sets (a synthetic run prints indices only)
CLASS_NAMES = {name: data.CLASS_NAMES[name] for name in ("mnist", "fashion-mnist")}
# longer side of the ink's box in the 28x28 frame, and how the box is placed: by centre of mass or by the box
FRAMING = {"mnist": (20, "mass"), "fashion-mnist": (28, "box")}
MIN_CONTRAST = 16  # grey levels between the darkest and lightest pixel; less: a blank image
INK_THRESHOLD = 0.3  # of the ink range: pixels above it define the bounding box
RIM_DIFFERENCE = 32  # grey levels between rim and inside of a cut-out that reveal its original background
MAX_SIDE = 4096  # MAX_SIDE**2 pixels at most: far below PIL's decompression-bomb limits (89 Mpx warned, 179 refused)
WORK_SIDE = 1024  # longer side a larger picture is reduced to before it becomes float arrays


# ------------------------------------------------------------------------------------------------ reading
def read_image(path: str | Path) -> Image.Image:
    """The decoded image of a file (first frame), upright; DistMnistError with a one-line reason otherwise."""
    p = Path(path)
    if not p.exists():
        raise DistMnistError("no such file")
    if p.is_dir():
        raise DistMnistError("is a directory, not an image file")
    try:
        f = open(p, "rb")  # closed by the with below
    except OSError as err:
        raise DistMnistError(f"cannot read the file ({err.strerror or err})") from None
    try:
        with f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_SIDE is the limit, one line
            with Image.open(f) as img:  # lazy: the header only
                width, height = img.size
                if width * height <= MAX_SIDE**2:
                    img.load()
                    img = ImageOps.exif_transpose(img)
    except Image.UnidentifiedImageError:
        raise DistMnistError("not an image file Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP...)") from None
    except Image.DecompressionBombError as err:  # over 179 Mpx: Image.open refuses it and keeps the size
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        raise DistMnistError(too_large(f"{int(pixels[1]) / 1e6:.0f} Mpx" if pixels else "over 179 Mpx")) from None
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise DistMnistError(f"cannot decode the image ({reason})") from None
    if width * height > MAX_SIDE**2:
        raise DistMnistError(too_large(f"{width}x{height} pixels ({width * height / 1e6:.1f} Mpx)"))
    return img


def too_large(size: str) -> str:
    return (f"image of {size} is above the limit of {MAX_SIDE}x{MAX_SIDE} pixels ({MAX_SIDE**2 / 1e6:.1f} Mpx); "
            f"scale it down first")


def _reduced(image: Image.Image) -> Image.Image:
    """At most WORK_SIDE px on the longer side, by a whole factor (box filter); smaller pictures as they are."""
    factor = -(-max(image.size) // WORK_SIDE)
    return image.reduce(factor) if factor > 1 else image


def _grey_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Grey levels (float32, 0..255) and alpha (0..1, or None when the image has no transparency), of the picture
    reduced to at most WORK_SIDE px: only that size ever becomes float arrays."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        wide = image if image.mode in ("I", "F") else image.convert("I")  # Image.reduce has no I;16 modes
        a = np.asarray(_reduced(wide), dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        if image.mode == "F" and a.max() <= 1.0:
            top = 1.0
        return np.clip(a * np.float32(255.0 / top), 0, 255), None
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if not has_alpha:
        return np.asarray(_reduced(image.convert("L")), dtype=np.float32), None
    rgba = image.convert("RGBA")
    if max(rgba.size) > WORK_SIDE:  # premultiplied while reduced: transparent pixels' colour must not tint the rim
        rgba = _reduced(rgba.convert("RGBa")).convert("RGBA")
    grey = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float32)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / np.float32(255.0)
    if alpha.min() >= 1.0:
        return grey, None
    return grey, alpha


def _cutout_background(grey: np.ndarray, alpha: np.ndarray) -> float:
    """The grey level (0 or 255) to composite a partly transparent image onto (rule 2 of the module doc)."""
    opaque = alpha >= 0.5
    transparent = ~opaque
    near = np.zeros_like(opaque)
    near[1:, :] |= transparent[:-1, :]
    near[:-1, :] |= transparent[1:, :]
    near[:, 1:] |= transparent[:, :-1]
    near[:, :-1] |= transparent[:, 1:]
    rim, inside = opaque & near, opaque & ~near
    if rim.any() and inside.sum() >= 4:
        difference = float(np.median(grey[inside]) - np.median(grey[rim]))
        if abs(difference) > RIM_DIFFERENCE:
            return 0.0 if difference > 0 else 255.0
    mean = float((grey * alpha).sum() / max(alpha.sum(), 1e-9))
    return 255.0 if mean < 128 else 0.0


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0, :], a[-1, :], a[1:-1, 0], a[1:-1, -1]])


# ------------------------------------------------------------------------------------------ preprocessing
def to_model_input(image: Image.Image, dataset: str | None = None) -> torch.Tensor:
    """An image file's picture as the model's input: float32 [1, 1, 28, 28], values uint8/255, ink bright.

    `dataset` (mnist | fashion-mnist | None) picks how a picture of another size is framed (see the module doc);
    None frames it as MNIST. DistMnistError for a blank image.
    """
    grey, alpha = _grey_and_alpha(image)
    if alpha is not None:
        bg_colour = _cutout_background(grey, alpha)
        grey = alpha * grey + (1.0 - alpha) * bg_colour
    lo, hi = float(grey.min()), float(grey.max())
    if hi - lo < MIN_CONTRAST:
        raise DistMnistError(f"blank image (grey levels {lo:.0f}..{hi:.0f}): nothing to classify")
    middle = (lo + hi) / 2
    border = _border(grey)
    if np.median(border) > middle:  # light background: invert so that the ink is bright
        # the middle moves with the grey levels; it is only symmetric (127.5) for a picture using 0..255
        grey, border, hi, middle = 255.0 - grey, 255.0 - border, 255.0 - lo, 255.0 - middle
    background_side = border[border <= middle]  # at least half the border: its median is on this side
    bg = float(np.median(background_side))

    if grey.shape == (SIZE, SIZE):  # framed already: only the background level moves to 0
        out = np.clip((grey - bg) * (255.0 / (255.0 - bg)), 0, 255) if bg > 0 else grey
        return _as_tensor(out)

    noise = float(np.percentile(background_side, 90) - bg)
    floor = bg + min(noise, 0.25 * (hi - bg))
    ink = np.clip((grey - floor) / max(hi - floor, 1e-9), 0.0, 1.0)
    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    if rows.size == 0:
        raise DistMnistError("no ink found above the background noise: nothing to classify")
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    side, centring = FRAMING.get(dataset or "mnist", FRAMING["mnist"])
    h, w = crop.shape
    scale = side / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    glyph = Image.fromarray(crop.astype(np.float32)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    glyph = np.clip(np.asarray(glyph, dtype=np.float64), 0.0, 1.0)
    if centring == "mass" and glyph.sum() > 0:
        ys, xs = np.indices(glyph.shape)
        cy, cx = (ys * glyph).sum() / glyph.sum(), (xs * glyph).sum() / glyph.sum()
        top, left = round((SIZE - 1) / 2 - cy), round((SIZE - 1) / 2 - cx)
    else:
        top, left = (SIZE - new_h) // 2, (SIZE - new_w) // 2
    top, left = min(max(top, 0), SIZE - new_h), min(max(left, 0), SIZE - new_w)
    canvas = np.zeros((SIZE, SIZE))
    canvas[top : top + new_h, left : left + new_w] = glyph * 255.0
    return _as_tensor(canvas)


def _as_tensor(grey: np.ndarray) -> torch.Tensor:
    """Grey levels -> uint8 -> float32 / 255, [1, 1, 28, 28] (bit for bit distmnist.data.to_float)."""
    u8 = torch.from_numpy(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return u8.reshape(1, 1, SIZE, SIZE).to(torch.float32).div(255)


# ------------------------------------------------------------------------------------------- prediction
def dataset_of_run(run_dir: str | Path) -> str | None:
    """data.name from the run dir's config.yaml (mnist | fashion-mnist), None if unknown."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        name = cfg["data"]["name"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, TypeError, KeyError):
        return None  # RecursionError: a config.yaml nested too deeply for PyYAML
    return name if name in CLASS_NAMES else None


def predict_files(model: torch.nn.Module, paths: list[str], dataset: str | None) -> list[dict]:
    """One result per path, in order: {path, class, name, prob, top3} or {path, error}."""
    results: list[dict] = []
    inputs: list[torch.Tensor] = []
    for path in paths:
        try:
            inputs.append(to_model_input(read_image(path), dataset))
            results.append({"path": path})
        except DistMnistError as err:
            results.append({"path": path, "error": str(err)})
    if inputs:
        model.eval()
        with torch.no_grad():
            probs = torch.softmax(model(torch.cat(inputs)).float(), dim=1)
        names = CLASS_NAMES.get(dataset or "")
        good = (r for r in results if "error" not in r)
        for r, p in zip(good, probs, strict=True):
            top_p, top_i = p.topk(3)
            top3 = [
                {"class": int(i), "name": names[int(i)] if names else None, "prob": float(q)}
                for q, i in zip(top_p, top_i, strict=True)
            ]
            r.update({"class": top3[0]["class"], "name": top3[0]["name"], "prob": top3[0]["prob"], "top3": top3})
    return results


def format_line(result: dict) -> str:
    name = f" ({result['name']})" if result["name"] is not None else ""
    return f"{result['path']}: class {result['class']}{name} p={result['prob']:.3f}"


@report_errors
def main(argv: list[str] | None = None) -> int:
    from distmnist.core.args import Parser
    from distmnist.tools.evaluate import find_weights, load_weights

    p = Parser(
        prog="distmnist predict",
        description="Classify image files (PNG, JPEG, ...; any size, colour or grey, light or dark background) "
        "with a trained model.pt.",
        epilog="Exit status: 0 if every image was classified; 2 if any could not be read (one line each on "
        "stderr, the others are still classified) or --model is bad. Class names: --classes, else the run's "
        "config.yaml, else the index only.",
    )
    p.add_argument("--model", required=True,
                   help="a run dir (its model.pt, else its newest checkpoint), a model.pt or any checkpoint")
    p.add_argument("--classes", choices=sorted(CLASS_NAMES),
                   help="data set the model was trained on: class names and framing (default: from the run's "
                   "config.yaml)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON list of {path, class, name, prob, top3} or {path, error}")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    args = p.parse_args(argv)

    path, run_dir = find_weights(args.model)  # a run dir, its model.pt, or any checkpoint of it
    model, _ = load_weights(path)
    dataset = args.classes or dataset_of_run(run_dir)
    results = predict_files(model, args.images, dataset)
    for r in results:
        if "error" in r:
            print(f"distmnist: error: {r['path']}: {r['error']}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" not in r:
                print(format_line(r))
    return USAGE_EXIT if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
