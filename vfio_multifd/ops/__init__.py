"""Around a running migration: the status socket, metrics, notifications, recording."""
