"""pytest configuration. Shared helpers live in helpers.py (``from helpers import ...``)."""
