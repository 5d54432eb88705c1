"""capacitor-trio: a store-and-forward DICOM router on Trio."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("capacitor-trio")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"
