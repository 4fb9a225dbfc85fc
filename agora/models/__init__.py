"""Model definitions (plain torch modules) and their loaders."""
