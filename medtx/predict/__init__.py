"""``medtx predict``: a bundle's fold ensemble on new raw scans (``medtx.bundle``)."""
