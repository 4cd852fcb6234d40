"""Set-of-Marks images: the first frame with numbered boxes, legible at the render size.

Digits come from a 3x5 pixel font scaled by the image size (x1 at 64 px, x2 at 128 px), drawn in
the box's colour on a black tag at the box's top-left corner, so they stay readable on any
background and tell which box they belong to.
"""

from __future__ import annotations

import numpy as np

# 3x5 bitmaps, rows top to bottom
_DIGITS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}
_GLYPHS = {d: np.array([[c == "1" for c in row] for row in rows]) for d, rows in _DIGITS.items()}

BOX_COLOURS = (
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (255, 255, 255),
    (255, 140, 0),
    (0, 255, 0),
    (255, 60, 60),
    (120, 160, 255),
    (255, 190, 220),
    (180, 255, 120),
)


def _text_mask(text: str, scale: int) -> np.ndarray:
    glyphs = []
    for ch in text:
        if ch not in _GLYPHS:
            raise ValueError(f"SoM labels are digits, got {text!r}")
        glyphs.append(_GLYPHS[ch])
        glyphs.append(np.zeros((5, 1), bool))
    mask = np.concatenate(glyphs[:-1], axis=1)
    return np.kron(mask, np.ones((scale, scale), bool))


def _tag_position(box_px, size, taken, shape) -> tuple[int, int]:
    """Top-left corner of a tag: inside the box's top-left corner if free, else the first free
    spot around the box, so tags never overlap (two tags side by side would read as one number)."""
    r0, c0, r1, c1 = box_px
    th, tw = size
    H, W = shape
    inside = [(r0, c0), (r0, c1 - tw + 1), (r1 - th + 1, c0), (r1 - th + 1, c1 - tw + 1)]
    outside = [(r0 - th - 1, c0), (r0, c1 + 2), (r0, c0 - tw - 1), (r1 + 2, c0)]
    # a tag inside a small box would hide the object it names
    small = (r1 - r0 + 1) < 2 * th or (c1 - c0 + 1) < 2 * tw
    spots = outside + inside if small else inside + outside

    def free(r: int, c: int) -> bool:
        return all(
            r + th + 1 <= tr or tr + h + 1 <= r or c + tw + 1 <= tc or tc + w + 1 <= c
            for tr, tc, h, w in taken
        )

    # spots that fit in the image as they are, then the same spots pushed inside the image
    for r, c in spots:
        if 0 <= r <= H - th and 0 <= c <= W - tw and free(r, c):
            return r, c
    clamped = [(int(np.clip(r, 0, H - th)), int(np.clip(c, 0, W - tw))) for r, c in spots]
    for r, c in clamped:
        if free(r, c):
            return r, c
    return clamped[0]


def draw_som(frame: np.ndarray, boxes: dict[int, tuple[float, float, float, float]]) -> np.ndarray:
    """Copy of `frame` (uint8 [H, W, 3]) with each box outlined and tagged with its number.

    boxes maps the SoM number to (x0, y0, x1, y1) in continuous pixel coordinates. All outlines are
    drawn first and the tags on top, so no outline crosses a number.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    img = frame.copy()
    H, W = img.shape[:2]
    scale = max(1, int(round(min(H, W) / 64)))
    line = scale
    pixel_boxes = {}
    for number in sorted(boxes):
        x0, y0, x1, y1 = boxes[number]
        colour = np.array(BOX_COLOURS[(number - 1) % len(BOX_COLOURS)], np.uint8)
        c0 = int(np.clip(np.floor(x0), 0, W - 1))
        r0 = int(np.clip(np.floor(y0), 0, H - 1))
        c1 = int(np.clip(np.ceil(x1) - 1, c0, W - 1))
        r1 = int(np.clip(np.ceil(y1) - 1, r0, H - 1))
        img[r0 : r0 + line, c0 : c1 + 1] = colour
        img[max(r1 - line + 1, 0) : r1 + 1, c0 : c1 + 1] = colour
        img[r0 : r1 + 1, c0 : c0 + line] = colour
        img[r0 : r1 + 1, max(c1 - line + 1, 0) : c1 + 1] = colour
        pixel_boxes[number] = (r0, c0, r1, c1)
    taken: list[tuple[int, int, int, int]] = []
    for number in sorted(boxes):
        colour = np.array(BOX_COLOURS[(number - 1) % len(BOX_COLOURS)], np.uint8)
        # the tag: black with a one-pixel (x scale) border, digits in the box's colour
        mask = _text_mask(str(number), scale)
        th, tw = mask.shape[0] + 2 * scale, mask.shape[1] + 2 * scale
        tr, tc = _tag_position(pixel_boxes[number], (th, tw), taken, (H, W))
        taken.append((tr, tc, th, tw))
        img[tr : tr + th, tc : tc + tw] = 0
        region = img[tr + scale : tr + scale + mask.shape[0], tc + scale : tc + scale + mask.shape[1]]
        region[mask] = colour
    return img


def _long_runs(mask: np.ndarray, length: int) -> np.ndarray:
    """The pixels of `mask` [H, W] on a horizontal or vertical run of at least `length` pixels."""
    out = np.zeros_like(mask)
    for m, o in ((mask, out), (mask.T, out.T)):
        padded = np.pad(m, ((0, 0), (1, 1))).astype(np.int8)
        d = np.diff(padded, axis=1)
        rows_s, cols_s = np.nonzero(d == 1)
        rows_e, cols_e = np.nonzero(d == -1)  # row-major: the k-th start and end belong together
        for r, a, b in zip(rows_s, cols_s, cols_e):
            if b - a >= length:
                o[r, a:b] = True
    return out


def boxes_from_som(image: np.ndarray, numbers, tolerance: int = 48) -> dict[int, tuple[float, float, float, float]]:
    """The boxes of a Set-of-Marks image drawn in this module's style (`draw_som`): for each SoM
    number, the extent of the straight lines of its colour (BOX_COLOURS, by number) at least one
    pixel longer than a digit (5 x the image's scale), i.e. of the outline without its number. Lines
    of another box drawn over it or a tag over a corner cut edges short but leave their extremes.

    image: uint8 [H, W, 3]. Returns {number: (x0, y0, x1, y1)} in continuous pixel coordinates of the
    image, for the numbers whose outline is found; a number whose colour has no such line (not drawn,
    or a box smaller than a digit) is left out. `tolerance`: the largest per-channel difference to
    the colour (lossy copies of the image shift colours a little). Numbers ten apart share a colour:
    with both drawn, each gets the extent of the two.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    H, W = image.shape[:2]
    length = 5 * max(1, int(round(min(H, W) / 64))) + 1  # draw_som's digit height, plus one
    img = image.astype(np.int16)
    out = {}
    for n in sorted(set(int(n) for n in numbers)):
        if n < 1:
            raise ValueError(f"SoM numbers start at 1, got {n}")
        colour = np.array(BOX_COLOURS[(n - 1) % len(BOX_COLOURS)], np.int16)
        lines = _long_runs((np.abs(img - colour) <= tolerance).all(-1), length)
        rows, cols = np.nonzero(lines)
        if len(rows):
            out[n] = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return out
