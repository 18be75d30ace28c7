"""The operator console: a static page and the route that serves it."""
