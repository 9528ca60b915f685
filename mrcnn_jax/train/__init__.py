"""Losses, train state, optimizer and the jitted data-parallel train step."""
