"""Analyses of trained networks (FEED's reconstruction error)."""
