"""The training loop and step, objective-agnostic."""
