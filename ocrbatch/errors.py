"""User-facing errors.

Every failure a user can cause (a bad path, a corrupt file, an unknown task)
is raised as an :class:`OcrbatchError` whose message is one line naming the
thing and the reason. The CLI prints that line and exits non-zero instead of
showing a traceback.
"""


class OcrbatchError(Exception):
    """An error caused by input or environment, reported as one line."""


class ModelError(OcrbatchError):
    """A model or GGUF that cannot be found, read or understood."""


class InputError(OcrbatchError):
    """An image or document that cannot be read."""
