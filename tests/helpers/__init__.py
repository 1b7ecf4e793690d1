"""Helpers shared by the tests, imported one way: `from tests.helpers.<module> import name`."""
