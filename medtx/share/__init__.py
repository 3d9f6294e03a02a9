"""Copies of scans made for sharing outside the lab (defaced native-space T1s)."""
