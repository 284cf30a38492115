"""The llmops store: SQL tables, the MLflow bridge, lineage and promotions.

It deals in bytes, hashes and names; it knows no file format (callers pass
format and quant as plain strings).
"""
