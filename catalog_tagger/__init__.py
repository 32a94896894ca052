"""catalog-tagger: tag product photos with garment types."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("catalog-tagger")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
