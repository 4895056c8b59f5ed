"""Tenants: API keys and per-tenant safety-patch policies."""
