"""Built-in models. Importing this package registers them (``idm``)."""

from . import idm  # noqa: F401
