"""Cutting a tensor into slices that each fit a link's packet (SPEC.md 5: how to cut is the encoder's freedom).

A slice codes rows ``row_first .. row_first + row_count - 1`` and channels
``channel_first .. channel_first + channel_count - 1`` of the tensor and decodes alone, so a lost packet
costs only its own block. Every slice costs its 26 bytes of header and CRC and the range coder's seal; how
the tensor is cut decides what else it costs. ``PLANS``:

- ``channels``: channel blocks over all rows, a channel cut into row bands only when it needs more than one
  packet by itself. A block keeps every neighbour context, and a lost block is concealed from the channels
  that arrived at the same positions (``lwfc_host.codec.conceal``). Measured on EfficientNet-Lite0 block 5 at
  MTU 1200 (results/lossy_links/): about 2-3% more bits than the whole frame, against 9-16% for row bands.
- ``rows``: row bands, each cut into channel blocks only when there are more slices than rows. Every band's
  first row loses its above neighbours, but a channel and its reference channel (SPEC.md 4.1) stay together,
  where a channel cut would cost several times the bits (+327% measured on that table with references).
- ``auto``: ``channels``, unless the table has reference channels.

Both plans start from a count of slices estimated from the whole frame's size, re-cut from the sizes they
measure, and halve whatever still does not fit.

MicroPython-compatible Python 3.7.
"""

from .errors import EncodeError

PLANS = ("auto", "rows", "channels")


def even_cuts(total, parts):
    """(first, count) of ``parts`` nearly equal runs covering 0 .. total - 1."""
    return [(total * i // parts, total * (i + 1) // parts - total * i // parts) for i in range(parts)]


def weighted_cuts(weights, parts):
    """(first, count) of ``parts`` runs covering 0 .. len(weights) - 1, each at least one long, whose summed
    weights are as equal as the cut points allow."""
    n = len(weights)
    total = 0.0
    for x in weights:
        total += x
    if total <= 0:
        return even_cuts(n, parts)
    cuts = []
    first = 0
    acc = 0.0
    for k in range(1, parts):
        target = total * k / parts
        end = first + 1  # at least one per run
        acc_end = acc + weights[first]
        while end < n - (parts - k) and acc_end + weights[end] / 2.0 <= target:
            acc_end += weights[end]
            end += 1
        cuts.append((first, end - first))
        first, acc = end, acc_end
    cuts.append((first, n - first))
    return cuts


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


def plan_row_regions(height, channels, slices):
    """At least ``slices`` regions (row_first, row_count, channel_first, channel_count) tiling an H x W x C
    tensor: row bands, each cut into the same number of channel blocks, as few regions as can be and, among
    those, as few channel blocks (whole rows keep more context)."""
    blocks, bands = grid(slices, channels, height)
    return [(r0, rn, c0, cn) for r0, rn in even_cuts(height, bands) for c0, cn in even_cuts(channels, blocks)]


def plan_channel_regions(height, channels, slices, weights=None):
    """At least ``slices`` regions tiling an H x W x C tensor: channel blocks over all rows, each cut into the
    same number of row bands only when there are more slices than channels; as few regions as can be and,
    among those, as few row bands. With ``weights`` (C numbers, e.g. the bytes each channel took) the channel
    blocks carry about equal weight instead of equal channel counts."""
    bands, blocks = grid(slices, height, channels)
    cuts = even_cuts(channels, blocks) if weights is None else weighted_cuts(weights, blocks)
    return [(r0, rn, c0, cn) for r0, rn in even_cuts(height, bands) for c0, cn in cuts]


def choose_plan(tables, plan="auto"):
    """``rows`` or ``channels`` for a table: ``auto`` cuts channels unless the table has reference channels."""
    if plan not in PLANS:
        raise ValueError("slice plan must be one of %s, got %r" % (", ".join(PLANS), plan))
    if plan != "auto":
        return plan
    for r in tables.reference_channel:
        if r >= 0:
            return "rows"
    return "channels"


def encode_sliced(encoder, indices, height, width, max_frame_bytes, plan="auto"):
    """Frames of at most ``max_frame_bytes`` each whose slices tile the tensor, in raster order of their
    regions (row_first, then channel_first). ``encoder``: what ``encode_indices(indices, height, width,
    region)`` and ``tables`` of ``lwfc.Encoder`` give; ``indices``: the whole tensor's index bytes, NHWC;
    ``plan``: one of ``PLANS``. A tensor whose whole frame fits is one unsliced frame. Raises EncodeError
    when even a one-row, one-channel slice does not fit."""
    plan = choose_plan(encoder.tables, plan)
    whole = encoder.encode_indices(indices, height, width)
    if len(whole) <= max_frame_bytes:
        return [whole]
    cut = _cut_rows if plan == "rows" else _cut_channels
    done = cut(encoder, indices, height, width, max_frame_bytes, len(whole))
    done.sort(key=lambda item: (item[0][0], item[0][2]))
    return [frame for _, frame in done]


def _encode_fitting(encoder, indices, height, width, max_frame, todo, halves):
    """(region, frame) of every region in ``todo``, each region that does not fit cut by ``halves`` until it
    does."""
    done = []
    while todo:
        region = todo.pop(0)
        frame = encoder.encode_indices(indices, height, width, region)
        if len(frame) <= max_frame:
            done.append((region, frame))
        elif region[1] == 1 and region[3] == 1:
            raise EncodeError("a one-row, one-channel slice takes %d bytes, more than the %d allowed"
                              % (len(frame), max_frame))
        else:
            todo[:0] = halves(region)
    return done


def _halve_rows_first(region):
    r0, rn, c0, cn = region
    if rn > 1:
        top = rn // 2
        return [(r0, top, c0, cn), (r0 + top, rn - top, c0, cn)]
    left = cn // 2
    return [(r0, rn, c0, left), (r0, rn, c0 + left, cn - left)]


def _halve_channels_first(region):
    r0, rn, c0, cn = region
    if cn > 1:
        left = cn // 2
        return [(r0, rn, c0, left), (r0, rn, c0 + left, cn - left)]
    top = rn // 2
    return [(r0, top, c0, cn), (r0 + top, rn - top, c0, cn)]


def _cut_rows(encoder, indices, height, width, max_frame, whole_bytes):
    """The ``rows`` plan: as many row bands as the whole frame's size needs with a 10% margin (for the
    bands' unequal sizes and their own seals), then halving (rows first)."""
    estimate = (whole_bytes * 11 // 10 + max_frame - 1) // max_frame
    todo = plan_row_regions(height, encoder.tables.channels, estimate)
    return _encode_fitting(encoder, indices, height, width, max_frame, todo, _halve_rows_first)


def _measure(encoder, indices, height, width, max_frame, todo, weights, rows):
    """Encode every region of ``todo``: (fitting (region, frame) pairs, regions that do not fit). Each frame's
    bytes are added to ``weights[channel]`` and, spread evenly over its rows, to ``rows[channel][row]``."""
    done = []
    failed = []
    for region in todo:
        frame = encoder.encode_indices(indices, height, width, region)
        if len(frame) <= max_frame:
            done.append((region, frame))
        else:
            failed.append(region)
        r0, rn, c0, cn = region
        share = float(len(frame)) / cn
        per_row = share / rn
        for ch in range(c0, c0 + cn):
            weights[ch] += share
            row = rows[ch]
            for r in range(r0, r0 + rn):
                row[r] += per_row
    return done, failed


def _cut_channels(encoder, indices, height, width, max_frame, whole_bytes, attempts=4):
    """The ``channels`` plan: as few channel blocks as fit. The whole frame's size gives a first count of
    equal blocks; while a block does not fit (at most ``attempts`` encodes of the tensor), the blocks are cut
    again to carry equal bytes as the last attempt measured them, one more block each time after the first
    re-cut; then blocks that still do not fit are halved (channels first). When there are more slices than
    channels, each channel is measured alone and cut by ``_cut_channel``."""
    channels = encoder.tables.channels
    count = (whole_bytes + max_frame - 1) // max_frame
    if count > channels:
        return _cut_channel_bands(encoder, indices, height, width, max_frame, count, attempts)
    weights = None
    for attempt in range(attempts):
        todo = plan_channel_regions(height, channels, count, weights)
        measured = [0.0] * channels
        rows = [[0.0] * height for _ in range(channels)]
        done, failed = _measure(encoder, indices, height, width, max_frame, todo, measured, rows)
        if not failed:
            return done
        if len(todo) >= channels:
            return _cut_channel_bands(encoder, indices, height, width, max_frame, len(todo) + 1, attempts)
        if attempt + 1 == attempts:
            break
        if weights is not None:
            count = len(todo) + 1
        weights = measured
    for region in failed:  # the last attempt: halve what does not fit
        done.extend(_encode_fitting(encoder, indices, height, width, max_frame, [region], _halve_channels_first))
    return done


def _cut_channel_bands(encoder, indices, height, width, max_frame, count, attempts):
    """More slices than channels: every channel cut into the same number of row bands and measured; a channel
    whose bands all fit and that needs them all keeps them, a channel that needs several slices is cut again by
    ``_cut_channel``, and runs of channels that fit one slice together share one, over all rows."""
    channels = encoder.tables.channels
    bands = min(height, (count + channels - 1) // channels)
    cuts = even_cuts(height, bands)
    out = []
    small = []  # consecutive channels that fit one slice each: (channel, bytes)

    def flush():
        while small:
            first, acc, k = small[0][0], 0.0, 0
            while k < len(small) and acc + small[k][1] <= max_frame:
                acc += small[k][1]
                k += 1
            region = (0, height, first, k)
            del small[:k]
            out.extend(_encode_fitting(encoder, indices, height, width, max_frame, [region], _halve_channels_first))

    for c in range(channels):
        todo = [(r0, rn, c, 1) for r0, rn in cuts]
        weights = [0.0] * (c + 1)
        rows = [None] * c + [[0.0] * height]
        done, failed = _measure(encoder, indices, height, width, max_frame, todo, weights, rows)
        # one slice's header, CRC and seal (about 30 bytes) is not part of the channel's bytes
        alone = weights[c] - 30.0 * (bands - 1)
        need = int((alone + max_frame - 1) // max_frame)
        if need <= 1:
            small.append((c, alone))
            continue
        flush()
        if not failed and need == bands:
            out.extend(done)
        else:
            out.extend(_cut_channel(encoder, indices, height, width, max_frame, c, rows[c], need, attempts))
    flush()
    return out


def _cut_channel(encoder, indices, height, width, max_frame, channel, row_weights, bands, attempts):
    """(region, frame) pairs of row bands of one channel that each fit: ``bands`` bands of about equal bytes by
    ``row_weights`` (its bytes per row as measured); while a band does not fit (at most ``attempts`` times),
    the rows are measured again on the bands just coded and cut again, one band more every second time; then
    halving."""
    bands = min(height, bands)
    for attempt in range(attempts):
        todo = [(r0, rn, channel, 1) for r0, rn in weighted_cuts(row_weights, bands)]
        weights = [0.0] * (channel + 1)
        rows = [None] * channel + [[0.0] * height]
        done, failed = _measure(encoder, indices, height, width, max_frame, todo, weights, rows)
        if not failed or bands >= height:
            break
        row_weights = rows[channel]
        if attempt % 2 == 1:
            bands += 1
    for region in failed:
        done.extend(_encode_fitting(encoder, indices, height, width, max_frame, [region], _halve_rows_first))
    return done
