"""Evaluation: feature and unit extraction, ABX, unit quality (PNMI), reports."""
