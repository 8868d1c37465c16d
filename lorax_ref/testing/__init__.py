"""Test support shared by the test suite and the conformance kit (hypothesis strategies)."""
