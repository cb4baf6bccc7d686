//! Offsets of tracepoint fields and kernel struct members, read at start-up.
