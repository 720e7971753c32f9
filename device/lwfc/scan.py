"""Scan orders (SPEC.md, section 4.1).

Without neighbour contexts (K = 1) the order is channel-planar: channel by channel, each channel's
H x W plane in raster order, so that each plane is coded with one model.

With neighbour contexts (K > 1) positions are visited by anti-diagonals of the H x W grid.
Position (h, w) lies on diagonal d = h + w. Diagonals are visited for d = 0 .. H + W - 2, and within
a diagonal h ascends. All C channels of a position are coded together, channel 0 first. Every
neighbour a context uses (above: (h-1, w); left: (h, w-1)) lies on diagonal d - 1, so a decoder
can decode a whole diagonal at once.
"""


def diagonal_positions(height, width):
    """Yield the raster index h * width + w of every position in scan order."""
    for d in range(height + width - 1):
        h = d - width + 1 if d >= width else 0
        h_end = d if d < height else height - 1
        p = h * width + d - h
        step = width - 1
        while h <= h_end:
            yield p
            p += step
            h += 1


def diagonal_runs(height, width):
    """Yield (first raster index, count) for each diagonal: its positions are first, first + W - 1, ..."""
    for d in range(height + width - 1):
        h0 = d - width + 1 if d >= width else 0
        h1 = d if d < height else height - 1
        yield h0 * width + d - h0, h1 - h0 + 1
