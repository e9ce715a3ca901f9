"""gRPC servicers (thin), server start-up, health, auth (`memlm.services`)."""
