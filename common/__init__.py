"""Code shared by the gateway and the model services (see README.md for the import rules)."""
