"""Serving: an HTTP search service over an index directory (``poeem serve``)."""

from poeem.serve.app import ServeConfig, create_app
from poeem.serve.service import IndexService

__all__ = ["IndexService", "ServeConfig", "create_app"]
