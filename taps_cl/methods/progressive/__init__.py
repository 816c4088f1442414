"""Progressive."""
