"""Suites: the YAML schema, its parsing, model and data builders, and the cell plan."""
