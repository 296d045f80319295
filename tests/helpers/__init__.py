"""Helpers shared by the tests, by concern: :mod:`helpers.cli` (the real CLI in a subprocess, processes),
:mod:`helpers.s3` (a local S3-compatible server), :mod:`helpers.runs` (hand-made runs with known answers,
comparing pairs), :mod:`helpers.sources` (real COCO data, every source format built by its own writer)."""
