"""The reliability tests reuse the HTTP-layer fixtures (the app over a fake engine)."""

from tests.api.conftest import scoring_calls  # noqa: F401 - a fixture, used by NO_SCORING
