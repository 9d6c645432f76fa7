"""The one training loop: its config, data, loop and Ray Train driver."""
