"""The one exception type users see for bad input.

Every message names the file, field or value at fault and what was expected, on one line, so the
CLI and the widgets can show it as it is instead of a traceback.
"""


class GenemapInputError(ValueError):
    """Bad input: a file, field or value that is not what napari-genemap expects."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class GenemapDataWarning(UserWarning):
    """Usable input that needed fixing (rows dropped, values clipped); the message says how many and why."""
