"""Device entry point: ``python -m lwfc run --bundle B --connect tcp://HOST:PORT --images DIR``."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lwfc", description="lwfc device: run the edge half and "
                                     "stream lwfc frames to a host (codec_spec/PROTOCOL.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from .runner import add_run_arguments

    p = sub.add_parser("run", help="preprocess images, run edge.tflite, encode, send, print the host's answers",
                       description="Run the int8 edge half on images, encode the features with lwfc, stream them "
                                   "to a host running `lwfc serve`, and print each answer and a summary.")
    add_run_arguments(p)
    args = parser.parse_args(argv)
    from .edge import EdgeError
    from .errors import LwfcError  # BundleError among them
    from .images import ImageError
    from .runner import RunnerError, run_from_args
    from .transport import TransportError

    try:
        return run_from_args(args)
    except (RunnerError, EdgeError, ImageError, TransportError, LwfcError) as exc:
        sys.stderr.write("python -m lwfc %s: error: %s\n" % (args.command, exc))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
