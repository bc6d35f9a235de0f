"""cacheproxy: a caching forward proxy for build systems."""

__version__ = "0.1.0"
