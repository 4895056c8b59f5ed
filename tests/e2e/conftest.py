"""The e2e tests' real server is the session's `live_server` (tests/support/live_fixtures.py,
shared with the reliability tests' slow tier)."""

from tests.support.live_fixtures import OPEN_POLICY, VLLM_ARGS

__all__ = ["OPEN_POLICY", "VLLM_ARGS"]
