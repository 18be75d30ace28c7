"""Adapters as a feature: keys, catalog (records, persistence, resolution), residency (engine
slots), the registry that joins them, sources and validation, and the management API."""
