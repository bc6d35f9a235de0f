"""Origin fetchers: HTTP(S) with retries, redirects, mirrors and resume."""
