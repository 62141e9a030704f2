"""Built-in tasks: readers of the official annotation formats, world writers, heads, metrics."""
