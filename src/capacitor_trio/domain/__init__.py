"""Pure values and decisions: no Trio, no I/O."""
