"""Built-in tasks: readers of the official annotation formats, heads, losses, metrics."""
