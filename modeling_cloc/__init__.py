"""modeling_cloc package."""
