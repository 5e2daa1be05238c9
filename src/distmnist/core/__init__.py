"""The pieces written once and called by name from the three strategies (docs/layout.md)."""
