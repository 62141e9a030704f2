"""The `vlprune` command line (installed as `vl_prune_cli`): parse, call vl_prune, print."""
