"""The gRPC servicers of the profile service, one module per service, and the conversions they share."""
