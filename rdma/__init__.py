"""rdax.rdma: the verbs wrapper, the only code in rdax that imports pyverbs."""
