"""Exceptions raised by vlmeff."""


class UnsupportedModelError(TypeError):
    """The object is not a model family vlmeff can patch."""
