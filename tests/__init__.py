"""The stream-ser test suite (a package, so tests import helpers as `tests.X`)."""
