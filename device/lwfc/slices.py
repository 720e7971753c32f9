"""Cutting a tensor into slices that each fit a link's packet (SPEC.md 5: how to cut is the encoder's freedom).

A slice codes rows ``row_first .. row_first + row_count - 1`` and channels
``channel_first .. channel_first + channel_count - 1`` of the tensor and decodes alone, so a lost packet
costs only its own block. The plan here: estimate the number of slices from the whole frame's size, cut
the rows into that many bands (and, when there are more slices than rows, each band into channel blocks),
then halve any slice that still comes out too big (rows first, then channels) until every frame fits.
"""

from .errors import EncodeError
from .frame import CRC_SIZE, SLICE_HEADER_SIZE


def even_cuts(total, parts):
    """(first, count) of ``parts`` nearly equal runs covering 0 .. total - 1."""
    return [(total * i // parts, total * (i + 1) // parts - total * i // parts) for i in range(parts)]


def grid(slices, outer_max, inner_max):
    """(outer, inner) with outer <= outer_max and inner <= inner_max: the fewest cells outer * inner that reach
    ``slices`` and, among those, the fewest ``outer`` (``slices`` more than both allow: every cell)."""
    best = None
    for outer in range(1, outer_max + 1):
        inner = (slices + outer - 1) // outer
        if inner > inner_max:
            continue
        if best is None or outer * inner < best[0] * best[1]:
            best = (outer, inner)
        if outer * inner == slices:
            break
    return best if best is not None else (outer_max, inner_max)


def plan_regions(height, channels, slices):
    """At least ``slices`` regions (row_first, row_count, channel_first, channel_count) tiling an H x W x C
    tensor: row bands, each cut into the same number of channel blocks, as few regions as can be and, among
    those, as few channel blocks (whole rows keep more context)."""
    blocks, bands = grid(slices, channels, height)
    return [(r0, rn, c0, cn) for r0, rn in even_cuts(height, bands) for c0, cn in even_cuts(channels, blocks)]


def _halves(region):
    r0, rn, c0, cn = region
    if rn > 1:
        top = rn // 2
        return [(r0, top, c0, cn), (r0 + top, rn - top, c0, cn)]
    left = cn // 2
    return [(r0, rn, c0, left), (r0, rn, c0 + left, cn - left)]


def encode_sliced(encoder, indices, height, width, max_frame_bytes):
    """Frames (each at most ``max_frame_bytes``) whose slices tile the tensor, in row-major order of their
    regions. ``indices``: the whole tensor's index bytes, NHWC. A tensor whose whole frame fits is one
    unsliced frame. Raises EncodeError when even a one-row, one-channel slice does not fit."""
    t = encoder.tables
    whole = encoder.encode_indices(indices, height, width)
    if len(whole) <= max_frame_bytes:
        return [whole]
    # room for payload per slice, with a 10% margin for the slices' unequal sizes and their own seals
    room = max(max_frame_bytes - SLICE_HEADER_SIZE - CRC_SIZE, 1)
    estimate = (len(whole) * 11 // 10 + room - 1) // room
    todo = plan_regions(height, t.channels, estimate)
    done = []
    while todo:
        region = todo.pop(0)
        frame = encoder.encode_indices(indices, height, width, region)
        if len(frame) <= max_frame_bytes:
            done.append((region, frame))
        elif region[1] == 1 and region[3] == 1:
            raise EncodeError("a one-row, one-channel slice takes %d bytes, more than the %d allowed"
                              % (len(frame), max_frame_bytes))
        else:
            todo[:0] = _halves(region)
    done.sort(key=lambda item: (item[0][0], item[0][2]))
    return [frame for _, frame in done]
