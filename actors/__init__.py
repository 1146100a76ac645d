"""Parley actor runtime: supervised Trio tasks with bounded mailboxes."""

from actors.actor import Actor, ActorDied, ActorRef, AskTimeout, Mailbox, MailboxFull
from actors.registry import NotRegistered, Registry
from actors.supervisor import ChildSpec, Escalation, Intensity, Restart, Strategy, Supervisor

__all__ = [
    "Actor",
    "ActorDied",
    "ActorRef",
    "AskTimeout",
    "ChildSpec",
    "Escalation",
    "Intensity",
    "Mailbox",
    "MailboxFull",
    "NotRegistered",
    "Registry",
    "Restart",
    "Strategy",
    "Supervisor",
]
