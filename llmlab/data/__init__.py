"""Data preparation: reading raw text, and (as the data stage grows) filtering, de-duplication, packing."""
