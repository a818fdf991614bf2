"""rdax.service: the storage node — seals, grants, revocation and the gRPC servicer."""
