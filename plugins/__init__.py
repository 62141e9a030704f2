"""vl_prune's built-in plugins, installed as `vl_prune_plugins` and registered as entry points."""
