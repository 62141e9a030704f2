"""The one exception type for bad user input: the CLI prints it as one line and exits with 2."""


class VLPruneError(Exception):
    """Something the user gave or asked for is wrong; the message names the file, flag or tensor."""
