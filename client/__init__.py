"""rdax.client: the client library and the `rdax` command line."""
