"""A plugin whose import fails, as a plugin with a missing dependency would."""

raise ImportError("vlprune_broken_method needs a package that is not installed")
