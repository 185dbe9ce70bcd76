"""Reproductions: scripts that run many training runs from one config and publish their tables."""
