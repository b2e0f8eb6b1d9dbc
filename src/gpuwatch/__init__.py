"""gpuwatch: which GPU is free right now, and who holds the others."""

from importlib.metadata import PackageNotFoundError, version

# The name on PyPI: `gpuwatch` there is an unrelated project.
DISTRIBUTION = "gpuwatch-stack"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
