"""Scan backends, one package per backend, each registered through the ``momkit_scan_backends`` hook."""
