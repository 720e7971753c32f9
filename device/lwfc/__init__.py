"""lwfc device codec: table-lookup quantization and constriction-compatible range coding of split-DNN
features. The codec core imported here is pure Python, MicroPython-compatible and standard-library only. The
board-side modules that may use numpy, Pillow, TFLite or pyserial (``edge``, ``images``, ``transport``) import
them inside their functions, and nothing here imports those modules."""

from .encoder import Encoder
from .errors import EncodeError, FrameError, LwfcError, TableError
from .frame import parse_frame, parse_header
from .tables import Tables, load_tables, parse_tables

__version__ = "0.1.0"
__all__ = [
    "Encoder", "Tables", "load_tables", "parse_tables", "parse_frame", "parse_header",
    "LwfcError", "TableError", "EncodeError", "FrameError",
]
