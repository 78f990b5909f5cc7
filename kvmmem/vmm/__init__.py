"""The VMM around the device: machine set-up, run loop, command line."""
