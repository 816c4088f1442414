"""Task flows."""
