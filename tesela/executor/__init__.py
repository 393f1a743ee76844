"""Turning scheduled batches into forward passes: batches, runners, graphs."""
