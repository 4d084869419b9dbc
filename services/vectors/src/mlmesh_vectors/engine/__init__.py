"""Storage engines behind one interface (``base.VectorBackend``)."""
