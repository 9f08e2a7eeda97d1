"""WMTP: weighted multi-token prediction (see DESIGN.md of the project)."""

__version__ = "0.1.0"
