"""lance-ray: run ByteDance's Lance model over datasets from YAML job files, on Ray."""

__version__ = "0.1.0"

from lance_ray.io.storage import resolve_media_uri  # noqa: E402  (after __version__, which sinks import)

__all__ = ["__version__", "resolve_media_uri"]
