"""The fusion cache: its format (shared with the reader), the labels of a sample, and the builder."""
