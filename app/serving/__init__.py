"""Serving classes: hold the engine client and turn validated requests into responses."""
