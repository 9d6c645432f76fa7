"""The stages of a run, one module (or package) each, found through the registry."""
