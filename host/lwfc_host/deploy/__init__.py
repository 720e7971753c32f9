"""Writing what a board needs onto it."""
