"""The int8 edge half on a board: THE one TFLite interpreter factory and the model wrapper the runner uses.

CPython only (numpy, and ai_edge_litert or tflite_runtime: Coral's stack, optionally with the Edge TPU
delegate). Both are imported inside the functions, so ``import lwfc.edge`` needs only the standard library
and the device package stays importable (and compilable by mpy-cross) where they are absent. The
converters and the host build their interpreters here too, so every part runs the edge half alike.
"""

import os

# The TFLite runtimes this code knows, by module name: pip's ai-edge-litert (numpy 2) and Coral's
# tflite-runtime (numpy < 2). Both offer interpreter.Interpreter and interpreter.load_delegate.
RUNTIMES = ("ai_edge_litert", "tflite_runtime")
EDGETPU_LIBRARY = "libedgetpu.so.1"


class EdgeError(Exception):
    """The edge half cannot run: no TFLite runtime, a missing model file, no Edge TPU delegate, or a model
    whose output is not int8."""


def _interpreter_module(prefer):
    """(Interpreter, load_delegate) of the first runtime that imports, ``prefer`` first."""
    if prefer not in RUNTIMES:
        raise EdgeError("unknown TFLite runtime %r (known: %s)" % (prefer, ", ".join(RUNTIMES)))
    for name in (prefer,) + tuple(r for r in RUNTIMES if r != prefer):
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert.interpreter import Interpreter, load_delegate
            else:
                from tflite_runtime.interpreter import Interpreter, load_delegate
        except ImportError:
            continue
        return Interpreter, load_delegate
    raise EdgeError("no TFLite runtime: install ai-edge-litert (pip) or tflite-runtime (Coral)")


def make_interpreter(path, prefer="ai_edge_litert", edgetpu=False, threads=None):
    """A TFLite interpreter for the model file ``path`` (str or path-like), tensors allocated.

    ``prefer``: the runtime tried first ("ai_edge_litert" or "tflite_runtime"); the other is the fallback.
    ``edgetpu``: run on the Coral Edge TPU delegate (the model must be compiled with edgetpu_compiler).
    ``threads``: interpreter threads (None: the runtime's default). Raises EdgeError."""
    interpreter, load_delegate = _interpreter_module(prefer)
    path = str(path)
    if not os.path.exists(path):
        raise EdgeError("edge model %s does not exist" % path)
    kwargs = {"model_path": path}
    if threads:
        kwargs["num_threads"] = threads
    if edgetpu:
        try:
            kwargs["experimental_delegates"] = [load_delegate(EDGETPU_LIBRARY)]
        except (OSError, ValueError) as exc:
            raise EdgeError("cannot load the Edge TPU delegate (%s): %s" % (EDGETPU_LIBRARY, exc)) from None
    interp = interpreter(**kwargs)
    interp.allocate_tensors()
    return interp


class EdgeModel(object):
    """The int8 edge half: float NHWC input -> int8 feature tensor (H x W x C numpy array).

    Attributes: ``interp``, the input and output details ``inp`` / ``out``, and their quantization
    ``in_scale``, ``in_zp``, ``out_scale``, ``out_zp`` (real = scale * (q - zero point))."""

    def __init__(self, path, edgetpu=False, threads=None, prefer="ai_edge_litert"):
        self.interp = make_interpreter(path, prefer, edgetpu, threads)
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.in_scale, self.in_zp = self.inp["quantization"]
        self.out_scale, self.out_zp = self.out["quantization"]
        if self.out["dtype"].__name__ != "int8":
            raise EdgeError("the edge model's output is %s, not int8" % self.out["dtype"].__name__)

    def run(self, x):
        """One float NHWC batch of 1 (``images.preprocess``) -> the int8 features, H x W x C."""
        import numpy as np

        if self.inp["dtype"].__name__ == "int8":
            # the model's own input scale and zero point: calibrated, or the grid on which the preprocessed
            # pixels lie exactly (EfficientNet-Lite: (p - 127)/128 becomes q = p - 128)
            x = np.clip(np.round(x / self.in_scale) + self.in_zp, -128, 127).astype(np.int8)
        self.interp.set_tensor(self.inp["index"], x.astype(self.inp["dtype"], copy=False))
        self.interp.invoke()
        q = self.interp.get_tensor(self.out["index"])
        return q.reshape(q.shape[-3:])
