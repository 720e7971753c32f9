"""The command line's one error type, in a module of its own so that the subcommand modules can import it
without importing the package that imports them."""


class CommandError(Exception):
    """An error the command line reports as one line and exit status 2 (bad input, not a bug)."""
