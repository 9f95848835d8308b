"""The daemon's I/O side: what reads sockets and writes files around the pure core."""
