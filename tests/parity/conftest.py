"""Parity tests need the reference library (a test-only dependency)."""

import pytest

pytest.importorskip("diffusers", reason="parity tests compare against the reference library")
