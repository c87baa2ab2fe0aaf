"""Calibration: masters (built and matched) and their application to each light."""
