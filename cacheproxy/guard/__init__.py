"""Access rules and the SSRF guard."""
