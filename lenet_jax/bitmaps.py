"""The fixed parameters of the Euclidean RBF output layer (paper section II-B).

Each output unit i holds a vector of 84 values in {-1, +1}: a stylised 7x12 bitmap of
the digit i (12 rows of 7 pixels, ink = +1, background = -1), to be compared with the 84
outputs of F6. The paper drew its bitmaps but did not tabulate them, so these glyphs are
this project's own design: two-pixel strokes that fill the whole 7x12 box, chosen so that
every pair of digits differs in at least 20 of the 84 pixels (see ``hamming_distances``).
"""

from __future__ import annotations

import numpy as np

ROWS, COLS = 12, 7

_GLYPHS: dict[int, list[str]] = {
    0: ["..###..",
        ".##.##.",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        ".##.##.",
        "..###.."],
    1: ["...##..",
        "..###..",
        ".####..",
        "##.##..",
        "...##..",
        "...##..",
        "...##..",
        "...##..",
        "...##..",
        "...##..",
        "...##..",
        ".######"],
    2: [".#####.",
        "##...##",
        ".....##",
        ".....##",
        "....##.",
        "...##..",
        "..##...",
        ".##....",
        "##.....",
        "##.....",
        "##.....",
        "#######"],
    3: ["######.",
        ".....##",
        ".....##",
        ".....##",
        "....##.",
        "..###..",
        "....##.",
        ".....##",
        ".....##",
        ".....##",
        ".....##",
        "######."],
    4: ["....##.",
        "...###.",
        "..####.",
        ".##.##.",
        "##..##.",
        "##..##.",
        "#######",
        "....##.",
        "....##.",
        "....##.",
        "....##.",
        "....##."],
    5: ["#######",
        "##.....",
        "##.....",
        "##.....",
        "#####..",
        "....##.",
        ".....##",
        ".....##",
        ".....##",
        ".....##",
        "##..##.",
        ".###..."],
    6: ["...###.",
        "..##...",
        ".##....",
        "##.....",
        "##.....",
        "######.",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        ".#####."],
    7: ["#######",
        ".....##",
        ".....##",
        "....##.",
        "....##.",
        "...##..",
        "...##..",
        "..##...",
        "..##...",
        ".##....",
        ".##....",
        ".##...."],
    8: [".#####.",
        "##...##",
        "##...##",
        "##...##",
        ".##.##.",
        "..###..",
        ".##.##.",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        ".#####."],
    9: [".#####.",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        "##...##",
        ".######",
        ".....##",
        ".....##",
        "....##.",
        "...##..",
        ".###..."],
}


def _to_array() -> np.ndarray:
    bitmaps = np.array(
        [[[1.0 if c == "#" else -1.0 for c in row] for row in _GLYPHS[d]] for d in range(10)],
        dtype=np.float32,
    )
    assert bitmaps.shape == (10, ROWS, COLS)
    return bitmaps


DIGIT_BITMAPS: np.ndarray = _to_array()
"""The 10 glyphs as a float32 array of shape (10, 12, 7) with values -1 / +1."""

RBF_CENTRES: np.ndarray = DIGIT_BITMAPS.reshape(10, ROWS * COLS)
"""The RBF parameter vectors w_i, shape (10, 84), F6 unit k = row k // 7, column k % 7."""


def hamming_distances(bitmaps: np.ndarray = DIGIT_BITMAPS) -> np.ndarray:
    """Pairwise count of differing pixels between the glyphs, shape (10, 10)."""
    flat = bitmaps.reshape(len(bitmaps), -1)
    return (flat[:, None, :] != flat[None, :, :]).sum(-1)


def ascii_art(digit: int, ink: str = "#", background: str = ".") -> str:
    """The glyph of ``digit`` as 12 lines of 7 characters."""
    return "\n".join(_GLYPHS[digit]).replace("#", ink).replace(".", background)
