"""napari dock widgets: thin Qt views over the core (see `session` for what they share)."""
