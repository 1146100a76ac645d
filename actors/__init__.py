"""Parley actor runtime: supervised Trio tasks with bounded mailboxes."""
