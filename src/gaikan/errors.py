"""Errors the user can act on. The CLI prints them as one line and exits with code 2."""


class GaikanError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug)."""


class DataError(GaikanError):
    """A data spec, folder or label file is missing or malformed."""


class ImageReadError(DataError):
    """An image file cannot be read or decoded. The message names the file."""


class ModelFormatError(GaikanError):
    """A saved model is missing, modified, or from an incompatible format version."""


class NotFittedError(GaikanError):
    """A detector was asked to score before it was fitted."""


class SettingsError(GaikanError):
    """An unknown or invalid detector setting."""
