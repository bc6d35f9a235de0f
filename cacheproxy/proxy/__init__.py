"""Request forms and client responses."""
