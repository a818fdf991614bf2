"""rdax.v1: the wire API, generated from rdax.proto (`make proto`)."""
