"""The receiving daemon's drivers: sockets, channels, loaders, the spill file, the commit."""
