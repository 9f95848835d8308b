"""Our source side: what stands in for QEMU's migration source."""
