"""etcd for Trio: leases, node registry, session ownership with fencing epochs."""
