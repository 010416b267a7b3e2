"""The version of thinslice, in one place: read by the build (pyproject), `thinslice --version`, DICOM outputs
and the docs; a module of its own so that modules deep in the package can name it without importing the package
root (which exports from the layers above them)."""

__version__ = "0.1.0"
