"""The one exception type of the data layer.

Every problem with the user's input (a missing folder, an empty class folder, a corrupt image, a bad argument) raises
:class:`DataError` with ONE line that names the path or argument, so a command-line front end can print ``str(e)``
without a traceback.
"""
from __future__ import annotations

__all__ = ["DataError"]

_WORKER_PREFIX = "Caught DataError in DataLoader worker"


class DataError(ValueError):
    """Bad data or a bad data argument; ``str(e)`` is a single line that names the path or argument.

    When a DataLoader worker raises a DataError, torch re-raises it in the main process as
    ``DataError("Caught DataError in DataLoader worker process N.\\nOriginal Traceback ...")``. That re-raise is
    recognised here and reduced to the original one-line message (plus which worker); the full text stays in
    :attr:`detail`.
    """

    def __init__(self, message: str = "") -> None:
        message = str(message)
        self.detail = message
        if message.startswith(_WORKER_PREFIX):
            lines = [ln for ln in message.strip().splitlines() if ln.strip()]
            where = lines[0][len("Caught DataError "):].rstrip(".")
            last = lines[-1]
            marker = "DataError: "
            if marker in last:
                last = last.split(marker, 1)[1]
            message = f"{last} (raised {where})"
        else:
            message = " ".join(message.split("\n")).strip()
        super().__init__(message)
