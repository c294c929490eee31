"""The broker: policy and peers, segments, and the event loop that wires them."""
