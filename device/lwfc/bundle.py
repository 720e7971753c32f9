"""Bundle directories: what ``lwfc convert`` writes and every other part reads (converters/README.md).

    bundle.json   what the bundle is: model, split, feature shape and int8 scale, preprocessing, ...
    edge.tflite   the int8 edge half (the board runs it)
    cloud.onnx    the cloud half (the host runs it)
    tables.json   the codec's table file, once ``lwfc design`` has made one

This module is the one place that reads and checks bundle.json and names these files, so that the
runner, the server, flashing, evaluation and design agree on what a bundle is. The bundle id
(PROTOCOL.md 5.1) is the first 8 hex digits of SHA-256 of bundle.json's bytes, exactly as stored: a
device names its bundle in HELLO with it. Standard library only (no os.path: MicroPython lacks it).
"""

import hashlib
import json

from .errors import BundleError

INFO_FILE = "bundle.json"
EDGE_FILE = "edge.tflite"
CLOUD_FILE = "cloud.onnx"
TABLES_FILE = "tables.json"
# bundle.json versions this code reads; a newer converter must bump the version when a field changes meaning.
KNOWN_VERSIONS = (1,)


def join(directory, name):
    """``directory/name`` for a directory given as a str (or anything str() gives a path for)."""
    directory = str(directory)
    if not directory or directory.endswith("/"):
        return directory + name
    return directory + "/" + name


def bundle_id_of(raw):
    """The bundle id of bundle.json's bytes: 8 lower-case hex digits."""
    return "".join("%02x" % b for b in hashlib.sha256(raw).digest()[:4])


def _require(cond, msg):
    if not cond:
        raise BundleError(msg)


def _check(info, where):
    """The fields every reader relies on, with their types; everything else is optional."""
    _require(isinstance(info, dict), "%s must hold a JSON object" % where)
    version = info.get("bundle_version", 1)
    _require(version in KNOWN_VERSIONS, "%s: bundle_version %r is not one of %r (a newer lwfc wrote it?)"
             % (where, version, KNOWN_VERSIONS))
    _require(isinstance(info.get("model"), str), "%s: 'model' must be a string" % where)
    feature = info.get("feature")
    _require(isinstance(feature, dict), "%s: 'feature' must be an object" % where)
    shape = feature.get("shape_nhwc")
    _require(isinstance(shape, list) and len(shape) == 4
             and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape),
             "%s: feature.shape_nhwc must be 4 positive integers, got %r" % (where, shape))
    for key in ("scale", "zero_point"):
        if key in feature:
            v = feature[key]
            _require(isinstance(v, (int, float)) and not isinstance(v, bool),
                     "%s: feature.%s must be a number, got %r" % (where, key, v))
    for key in ("preprocessing", "edge", "cloud"):
        _require(info.get(key) is None or isinstance(info[key], dict), "%s: %r must be an object" % (where, key))
    names = info.get("class_names")
    _require(names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)),
             "%s: class_names must be a list of strings" % where)


class Bundle(object):
    """A checked bundle directory.

    Attributes: ``directory`` (as given), ``info`` (bundle.json as a dict), ``id`` (the bundle id),
    ``model`` (the zoo name), ``feature_shape`` ((H, W, C) ints), ``class_names`` (list, maybe empty),
    ``task`` ("classification", "detection" or "" for bundles older than the field).
    """

    def __init__(self, directory, info, raw):
        _check(info, join(directory, INFO_FILE))
        self.directory = directory
        self.info = info
        self.id = bundle_id_of(raw)
        self.model = info["model"]
        self.feature_shape = tuple(info["feature"]["shape_nhwc"][1:])
        self.class_names = list(info.get("class_names") or [])
        self.task = info.get("task") or ""

    def path(self, name):
        """The path of file ``name`` in the bundle directory (it may not exist)."""
        return join(self.directory, name)

    def file_of(self, part):
        """The path of the ``edge`` or ``cloud`` model file, as bundle.json names it."""
        default = EDGE_FILE if part == "edge" else CLOUD_FILE
        return self.path((self.info.get(part) or {}).get("file") or default)

    @property
    def edge_path(self):
        return self.file_of("edge")

    @property
    def cloud_path(self):
        return self.file_of("cloud")

    @property
    def tables_path(self):
        return self.path(self.info.get("tables") or TABLES_FILE)

    @property
    def preprocessing(self):
        """bundle.json's preprocessing section; BundleError if the bundle has none (a board needs it)."""
        spec = self.info.get("preprocessing")
        _require(spec is not None, "%s has no preprocessing section" % self.path(INFO_FILE))
        return spec

    def __repr__(self):
        return "Bundle(%r, model=%r, id=%s)" % (self.directory, self.model, self.id)


def load_bundle(directory):
    """Read and check ``directory/bundle.json`` (or that file, if ``directory`` names it): a ``Bundle``.
    Raises BundleError, saying which file and what was wrong."""
    directory = str(directory)
    if directory.endswith("/" + INFO_FILE) or directory == INFO_FILE:
        directory = directory[: -len(INFO_FILE)].rstrip("/") or "."
    path = join(directory, INFO_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BundleError("cannot read %s: %s (is %s a bundle directory?)"
                          % (path, getattr(exc, "strerror", None) or exc, directory)) from None
    try:
        info = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeError) as exc:
        raise BundleError("%s is not valid JSON: %s" % (path, exc)) from None
    return Bundle(directory, info, raw)


def bundle_id(directory):
    """The bundle id of ``directory`` (reads and checks bundle.json)."""
    return load_bundle(directory).id
