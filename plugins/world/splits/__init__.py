"""Each task's split of the embedded world, written in the task's official layout."""
