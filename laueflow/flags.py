"""What the per-pixel codes of a result mean: the decoder's quality bits and the pixel states.

Defined once here (no JAX, so readers of results load quickly): the decoder sets the bits
(laueflow.decode.passes), the point file stores both tables beside the data they describe
(laueflow.io.pointfile, as CF ``flag_masks`` / ``flag_values`` with ``flag_meanings``), and the figures
and summaries name them from there.
"""

from __future__ import annotations

from typing import NamedTuple


class Flag(NamedTuple):
    """One code: its value (a bit for quality flags), a short name and what it means."""

    value: int
    name: str
    meaning: str


# quality bits of a decoded pixel (0 = good)
NO_SIGNAL = 1
NO_BACKGROUND = 2
CONTRAST = 4
POOR_FIT = 8
ENERGY_AMBIGUOUS = 16

QUALITY_FLAGS: tuple[Flag, ...] = (
    Flag(NO_SIGNAL, "no_signal", "no modulation above noise: a background pixel, its profile is zero"),
    Flag(NO_BACKGROUND, "no_background",
         "no dark pixels in its block to measure the background; intensities assume the configured energy"),
    Flag(CONTRAST, "contrast",
         "fitted contrast outside what any energy in the range gives; scaled at the configured energy"),
    Flag(POOR_FIT, "poor_fit", "reduced chi-square of the fit above 3"),
    Flag(ENERGY_AMBIGUOUS, "energy_ambiguous", "energy asked for, but the contrast fits several energies"),
)

# state of every pixel of the region (the point file's pixel_state map)
PIXEL_NOT_SELECTED = 0
PIXEL_DECODED = 1
PIXEL_SATURATED = 2
PIXEL_NO_BLOCK = 3

PIXEL_STATES: tuple[Flag, ...] = (
    Flag(PIXEL_NOT_SELECTED, "not_selected",
         "not decoded: mean counts below file.threshold, or a trace the decoder cannot use "
         "(flat, or at full scale once scaled by the monitor)"),
    Flag(PIXEL_DECODED, "decoded", "decoded: its profile and diagnostics are in the file"),
    Flag(PIXEL_SATURATED, "saturated", "not decoded: some frame reached 65535 counts"),
    Flag(PIXEL_NO_BLOCK, "no_block", "not decoded: the block holding it failed (the point is partial)"),
)


def names(flags: tuple[Flag, ...], value: int, bits: bool) -> list[str]:
    """The names of the codes in ``value``: every set bit when ``bits``, else the one equal code."""
    if bits:
        return [f.name for f in flags if value & f.value]
    return [f.name for f in flags if value == f.value]
