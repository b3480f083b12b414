"""Format-specific edges: readers turn files into Arrow record batches, writers turn them back."""
