"""Plugins for voice-agent frameworks (each imports its framework: install the matching extra)."""
