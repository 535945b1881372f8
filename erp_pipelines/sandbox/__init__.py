"""Simulated ERP APIs ("the sandbox") for tests, benchmarks and the demo.

Every simulator renders the same deterministic truth ledger (`ledger.py`) through its vendor's
real API: paths, auth, field names, units, pagination, rate-limit headers and error bodies.
"""
