"""lance-ray: run ByteDance's Lance model over datasets from YAML job files, on Ray."""

__version__ = "0.1.0"
