"""The one error type of the data package: a one-line message naming the problem and what is valid."""

from __future__ import annotations


class DataError(ValueError):
    """Unusable data (missing folder, no NIfTI found, no foreground, a modality missing from a subject).

    The command line prints it as one ``error: ...`` line and exits with code 2.
    """
