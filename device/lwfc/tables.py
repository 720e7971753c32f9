"""Table files: load, validate, and prepare the lookups the encoder needs (SPEC.md, section 3).

A table file is JSON. The device reads only integers from it (the int8 lookup table, thresholds,
context maps and model frequencies); the floats (clip range, int8 scale, reconstruction values) are
there for the host and for people. What the table id hashes is decided by the parsed values (SPEC.md 3.2),
so a reader rejects what would make them ambiguous: a key twice in one object, a number that is not
finite (NaN, Infinity, or a literal such as 1e400 that overflows), a boolean or a float where an integer
is required.
"""

import json

from .errors import TableError

FORMAT = "lwfc-tables"
VERSION = 2  # the newest table version this reader reads; it reads every version in VERSIONS
VERSIONS = (1, 2)
PRECISION = 24
TOTAL = 1 << PRECISION
MAX_LEVELS = 64  # version 2; version 1 tables have at most MAX_LEVELS_V1
MAX_LEVELS_V1 = 16
MAX_GROUPS = 256
MAX_CHANNELS = 65535
MAX_KEYS = 65536  # models * levels (version 2): the range coder key m * N + s fits 16 bits


def _require(cond, msg):
    if not cond:
        raise TableError(msg)


def _is_int(v):
    # bool is an int subclass in Python: reject it explicitly. 1.0 is a float, not an integer (SPEC.md 3.1).
    return isinstance(v, int) and not isinstance(v, bool)


def _int(obj, name, lo, hi):
    """A scalar integer field in lo..hi."""
    _require(_is_int(obj) and lo <= obj <= hi, "%s must be an integer in %d..%d, found %r" % (name, lo, hi, obj))
    return obj


def _int_list(obj, name, length=None):
    _require(isinstance(obj, list), "%s must be a list" % name)
    if length is not None:
        _require(len(obj) == length, "%s must have %d entries, has %d" % (name, length, len(obj)))
    for v in obj:
        _require(_is_int(v), "%s must hold integers, found %r" % (name, v))
    return obj


def _number(obj, name):
    _require(isinstance(obj, (int, float)) and not isinstance(obj, bool), "%s must be a number" % name)
    _require(obj == obj and obj not in (float("inf"), float("-inf")), "%s must be finite" % name)
    return obj


def _check_finite(obj):
    """Reject a number that is not finite anywhere in the table, informative fields included, naming its
    place (e.g. ``design.rate`` or ``reconstruction[2]``). Iterative: MicroPython's stack is small."""
    todo = [(obj, "")]
    while todo:
        v, where = todo.pop()
        if isinstance(v, float):
            _require(v == v and v not in (_INF, -_INF),
                     "%s is not a finite number (%r)" % (where or "the table", v))
        elif isinstance(v, dict):
            for k in v:
                todo.append((v[k], "%s.%s" % (where, k) if where else str(k)))
        elif isinstance(v, list):
            for i in range(len(v)):
                todo.append((v[i], "%s[%d]" % (where, i)))


_INF = float("inf")
_HEX = "0123456789abcdef"


def _get(d, key, where="table"):
    _require(isinstance(d, dict), "%s must be a JSON object" % where)
    _require(key in d, "%s has no field %r" % (where, key))
    return d[key]


def context_number(group, class_above, class_left, classes, class_reference=0, reference_classes=1):
    """The context rule (SPEC.md 4.2), stated once for the device core.

    Element (h, w, c) of a slice has an above neighbour index a (of (h - 1, w, c), or N, "outside", when
    row h - 1 is not in the slice), a left neighbour index l (of (h, w - 1, c), or N when w = 0) and a
    reference index b (of (h, w, reference_channel[c]), or N when c has no reference channel in the
    slice; version 1 tables have none). With g = channel_group[c], K classes and R reference classes,
    the element's context number is

        x = ((g * R + reference_class[b]) * K + neighbour_class[a]) * K + neighbour_class[l]

    and it is coded with model model_of_context[x]. With R = 1 (every version 1 table) this is
    x = g * K^2 + neighbour_class[a] * K + neighbour_class[l]; with K = 1 and R = 1, x = g.

    This function is that formula on the classes. It is plain integer arithmetic, so the encoder uses it
    both per element and on many elements at once: its fast path passes byte lanes packed into big
    integers with group 0 (R * K^2 <= 256 keeps every lane below 256, so lanes never carry). The host's
    vectorised form, on numpy arrays, is ``lwfc_host.codec.fast.context_ids``; a test ties the two.
    """
    return ((group * reference_classes + class_reference) * classes + class_above) * classes + class_left


class Tables(object):
    """A validated table file, with the lookups the encoder uses.

    Attributes (all plain Python ints and lists):
      table_id (4 bytes), version (1 or 2), channels (C), levels (N), classes (K), groups (G),
      reference_classes (R; 1 for version 1 tables),
      index_of_q (256 ints, q = -128..127), frac_bits, thresholds (N-1 ints),
      neighbour_class (N+1 ints; entry N is "outside the slice"), channel_group (C ints),
      reference_channel (C ints, -1: no reference; all -1 for version 1 tables),
      reference_class (N+1 ints; entry N is "no reference"; all 0 for version 1 tables),
      model_of_context (G*R*K*K ints), models (lists of N frequencies),
      start, freq: the range coder's (cumulative start, frequency) per key ``m * N + index`` of model m,
      model_key: per group g, the list over y = context_number(0, class_above, class_left, K, class_reference, R)
        (y < R*K*K <= 256) of ``model_of_context[g * R*K*K + y] * N``, the key of index 0 in y's model.
      raw: the parsed JSON object.
    Every field is checked, in a fixed order (first: no number anywhere is NaN or infinite); the first
    failing check raises TableError.
    """

    def __init__(self, obj):
        self.raw = obj
        _require(isinstance(obj, dict), "a table file must hold a JSON object")
        _check_finite(obj)
        self._read_header(obj)
        self._read_shape(obj)
        self._read_int8(obj)
        self._read_float_input(obj)
        self._read_reconstruction(obj)
        self._read_contexts(_get(obj, "contexts"))
        self._read_models(obj)
        self._build_keys()

    def _read_header(self, obj):
        """format, version, table_id, layout."""
        _require(_get(obj, "format") == FORMAT, "format must be %r, found %r" % (FORMAT, obj.get("format")))
        version = _get(obj, "version")
        _require(_is_int(version) and version in VERSIONS,
                 "unsupported table version %r (this reader reads the integers %s)"
                 % (version, ", ".join(str(v) for v in VERSIONS)))
        self.version = version
        tid = _get(obj, "table_id")
        _require(isinstance(tid, str) and len(tid) == 8 and all(ch in _HEX for ch in tid),
                 "table_id must be 8 lower-case hex digits, found %r" % (tid,))
        self.table_id = bytes(int(tid[i:i + 2], 16) for i in range(0, 8, 2))
        _require(_get(obj, "layout") == "NHWC", "layout must be 'NHWC'")

    def _read_shape(self, obj):
        """channels, levels, and the clip range (checked; only the host uses it)."""
        channels = _int(_get(obj, "channels"), "channels", 1, MAX_CHANNELS)
        levels = _int(_get(obj, "levels"), "levels", 2, MAX_LEVELS if self.version >= 2 else MAX_LEVELS_V1)
        self.channels = channels
        self.levels = levels
        clip_min = _number(_get(obj, "clip_min"), "clip_min")
        clip_max = _number(_get(obj, "clip_max"), "clip_max")
        _require(clip_min < clip_max, "clip_min must be below clip_max")

    def _read_int8(self, obj):
        """int8: scale and zero point (checked), and index_of_q, the lookup the device quantizes by."""
        levels = self.levels
        int8 = _get(obj, "int8")
        scale = _number(_get(int8, "scale", "int8"), "int8.scale")
        _require(scale > 0, "int8.scale must be positive")
        _int(_get(int8, "zero_point", "int8"), "int8.zero_point", -128, 127)
        lut = _int_list(_get(int8, "index_of_q", "int8"), "int8.index_of_q", 256)
        for i, v in enumerate(lut):
            _require(0 <= v < levels, "int8.index_of_q[%d] = %d is outside 0..%d" % (i, v, levels - 1))
            _require(i == 0 or v >= lut[i - 1], "int8.index_of_q must be non-decreasing (entry %d)" % i)
        self.index_of_q = lut

    def _read_float_input(self, obj):
        """float_input: fixed-point fraction bits and the N - 1 thresholds."""
        fl = _get(obj, "float_input")
        frac_bits = _int(_get(fl, "frac_bits", "float_input"), "float_input.frac_bits", 0, 24)
        thr = _int_list(_get(fl, "thresholds", "float_input"), "float_input.thresholds", self.levels - 1)
        for i in range(1, len(thr)):
            _require(thr[i] > thr[i - 1], "float_input.thresholds must be strictly increasing")
        for t in thr:
            _require(-(1 << 31) < t < (1 << 31), "float_input.thresholds must fit in int32")
        self.frac_bits = frac_bits
        self.thresholds = thr

    def _read_reconstruction(self, obj):
        recon = _get(obj, "reconstruction")
        _require(isinstance(recon, list) and len(recon) == self.levels,
                 "reconstruction must list %d values" % self.levels)
        for v in recon:
            _number(v, "reconstruction value")
        self.reconstruction = recon

    def _read_contexts(self, ctx):
        """contexts: groups G, classes K, the channel -> group and neighbour index -> class maps, (version 2)
        the reference channels and reference classes R, and model_of_context (checked against the models in
        ``_read_models``)."""
        channels, levels = self.channels, self.levels
        groups = _int(_get(ctx, "groups", "contexts"), "contexts.groups", 1, min(channels, MAX_GROUPS))
        if self.version >= 2:
            refs = _int(_get(ctx, "reference_classes", "contexts"), "contexts.reference_classes", 1, 256)
        else:
            refs = 1
        classes = _get(ctx, "classes", "contexts")
        if self.version >= 2:
            _require(_is_int(classes) and classes >= 1 and refs * classes * classes <= 256,
                     "contexts.classes K must be an integer >= 1 with reference_classes*K*K <= 256, found %r"
                     % (classes,))
        else:
            _require(_is_int(classes) and classes >= 1 and classes * classes * levels <= 256,
                     "contexts.classes K must be an integer >= 1 with K*K*levels <= 256, found %r" % (classes,))
        cg = _int_list(_get(ctx, "channel_group", "contexts"), "contexts.channel_group", channels)
        for v in cg:
            _require(0 <= v < groups, "contexts.channel_group entry %d outside 0..%d" % (v, groups - 1))
        ncls = _int_list(_get(ctx, "neighbour_class", "contexts"), "contexts.neighbour_class", levels + 1)
        for v in ncls:
            _require(0 <= v < classes, "contexts.neighbour_class entry %d outside 0..%d" % (v, classes - 1))
        if self.version >= 2:
            rch = _int_list(_get(ctx, "reference_channel", "contexts"), "contexts.reference_channel", channels)
            for c, r in enumerate(rch):
                _require(-1 <= r < channels and r != c,
                         "contexts.reference_channel[%d] = %d is not -1 or another channel" % (c, r))
                _require(r == -1 or rch[r] == -1,
                         "contexts.reference_channel[%d] = %d names a channel that has a reference itself" % (c, r))
            rcls = _int_list(_get(ctx, "reference_class", "contexts"), "contexts.reference_class", levels + 1)
            for v in rcls:
                _require(0 <= v < refs, "contexts.reference_class entry %d outside 0..%d" % (v, refs - 1))
        else:
            rch = [-1] * channels
            rcls = [0] * (levels + 1)
        moc = _int_list(_get(ctx, "model_of_context", "contexts"), "contexts.model_of_context",
                        groups * refs * classes * classes)
        self.groups = groups
        self.classes = classes
        self.reference_classes = refs
        self.channel_group = cg
        self.neighbour_class = ncls
        self.reference_channel = rch
        self.reference_class = rcls
        self.model_of_context = moc

    def _read_models(self, obj):
        """models: M lists of N integer frequencies, each >= 1, each list summing to 2^24."""
        models = _get(obj, "models")
        most = self.groups * self.reference_classes * self.classes * self.classes
        if self.version >= 2:
            most = min(most, MAX_KEYS // self.levels)
        _require(isinstance(models, list) and 1 <= len(models) <= most,
                 "models must list 1..%d models (groups*reference_classes*classes^2%s)"
                 % (most, ", and models*levels <= 65536" if self.version >= 2 else ""))
        for m, freqs in enumerate(models):
            _int_list(freqs, "models[%d]" % m, self.levels)
            for f in freqs:
                _require(f >= 1, "models[%d] has a frequency below 1" % m)
            _require(sum(freqs) == TOTAL, "models[%d] sums to %d, not 2^24" % (m, sum(freqs)))
        for v in self.model_of_context:
            _require(0 <= v < len(models), "contexts.model_of_context entry %d outside 0..%d" % (v, len(models) - 1))
        self.models = models

    def _build_keys(self):
        """start/freq per range coder key ``m * N + index``, and each group's key of index 0 per local context y
        (``model_key``; see ``context_number``)."""
        n = self.levels
        start, freq = [], []
        for freqs in self.models:
            acc = 0
            for f in freqs:
                start.append(acc)
                freq.append(f)
                acc += f
        self.start = start
        self.freq = freq
        per_group = self.reference_classes * self.classes * self.classes
        moc = self.model_of_context
        self.model_key = [[moc[g * per_group + y] * n for y in range(per_group)] for g in range(self.groups)]

    def channels_in_order(self, channel_first, channel_count):
        """The channels of a slice with channels [channel_first, channel_first + channel_count), in the order
        the scan visits them at a position (SPEC.md 4.1): those without a reference channel in the slice
        ascending, then those with one, ascending. Returns (independent, dependent) lists of channels."""
        end = channel_first + channel_count
        independent, dependent = [], []
        for c in range(channel_first, end):
            r = self.reference_channel[c]
            if channel_first <= r < end:
                dependent.append(c)
            else:
                independent.append(c)
        return independent, dependent

    def table_id_hex(self):
        return "".join("%02x" % b for b in self.table_id)


def duplicate_key(text):
    """The first key that occurs twice in one object of the JSON text ``text`` (bytes, already known to be
    valid JSON), as a path such as ``int8.scale``; None if every object's keys are distinct.

    A plain scan over the bytes (JSON's structural characters, quotes and backslashes are ASCII, and UTF-8
    never uses those bytes inside a multi-byte character): MicroPython's json.loads keeps the last of two
    equal keys and has no hook to see them, so the check cannot ride on the parser."""
    containers = []  # per open container: a set of keys (object) or None (array)
    names = []  # per open container: its path
    counts = []  # per open container: the current array index
    last_key = []  # per open container: the last key read (objects)
    expect_key = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == 0x22:  # a string: find its closing quote, stepping over escapes
            j = i + 1
            while text[j] != 0x22:
                j += 2 if text[j] == 0x5C else 1
            if expect_key:
                raw = text[i + 1:j]
                key = json.loads(text[i:j + 1].decode()) if 0x5C in raw else raw.decode()
                keys = containers[-1]
                path = names[-1] + "." + key if names[-1] else key
                if key in keys:
                    return path
                keys.add(key)
                last_key[-1] = path
                expect_key = False
            i = j + 1
            continue
        if ch == 0x7B or ch == 0x5B:  # { or [
            if containers:
                parent = last_key[-1] if containers[-1] is not None else "%s[%d]" % (names[-1], counts[-1])
            else:
                parent = ""
            containers.append(set() if ch == 0x7B else None)
            names.append(parent)
            counts.append(0)
            last_key.append("")
            expect_key = ch == 0x7B
        elif ch == 0x7D or ch == 0x5D:  # } or ]
            containers.pop()
            names.pop()
            counts.pop()
            last_key.pop()
            expect_key = False
        elif ch == 0x2C:  # ,
            if containers[-1] is None:
                counts[-1] += 1
            else:
                expect_key = True
        i += 1
    return None


def parse_tables(text):
    """Parse and validate a table file's text (UTF-8 bytes or str). Raises TableError."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    try:
        obj = json.loads(data.decode())
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; so is MicroPython's
        raise TableError("table file is not valid JSON: %s" % exc) from None
    except RuntimeError as exc:  # nested too deeply: RecursionError (CPython), RuntimeError (MicroPython)
        raise TableError("table file is not valid JSON: %s" % exc) from None
    dup = duplicate_key(data)
    _require(dup is None, "duplicate key %s: a key may occur only once in each JSON object" % dup)
    return Tables(obj)


def load_tables(path):
    """Read and validate a table file."""
    with open(path, "rb") as f:
        return parse_tables(f.read())
