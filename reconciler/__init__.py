"""Declarative certificate reconciler for PostgreSQL client-certificate (mTLS) authentication."""

__version__ = "0.1.0"
