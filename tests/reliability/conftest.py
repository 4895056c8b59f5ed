"""The reliability tests reuse the HTTP-layer fixtures (the app over a fake engine)."""

from tests.api.conftest import api_database, scoring_calls  # noqa: F401 - fixtures
