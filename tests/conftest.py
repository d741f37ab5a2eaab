"""Fixtures shared by the whole suite live in tests/fixtures, one module per area."""

pytest_plugins = [
    "tests.fixtures.stores",
    "tests.fixtures.stack",
    "tests.fixtures.idp",
    "tests.fixtures.tls",
]
