"""The one exception family for problems a user can cause.

Every message names what was expected and what came. Internal invariants use
plain ``RuntimeError`` / ``AssertionError`` and are not caught by the CLI.
"""

from __future__ import annotations


class EprojError(Exception):
    """Base class of every error a user can cause (bad input, bad file, bad option)."""


class DataError(EprojError):
    """A data spec, folder or image is missing, unreadable or of the wrong shape."""


class CheckpointError(EprojError):
    """A checkpoint or model file is missing, corrupted or does not match the run."""


class ConfigError(EprojError):
    """An option or parameter is out of its valid range."""


class ArrayError(EprojError):
    """An array has the wrong dtype, shape, device or memory layout for where it was passed."""


class BundleError(EprojError):
    """A bundle is missing, tampered with, of another schema version, or its manifest breaks the
    schema (a field of the wrong type, a non-finite number, a file outside the bundle folder)."""
