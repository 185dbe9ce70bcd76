"""Offline quality metrics for the demo (digits) runs."""
