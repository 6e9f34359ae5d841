"""Suite kinds."""
