"""Shared by the actor tests."""

from __future__ import annotations

import trio

from actors import Actor, ActorRef


async def run_capturing(
    actor: Actor,
    errors: list[BaseException],
    *,
    task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``actor`` and record, rather than raise, the exception that ends it."""
    try:
        await actor.run(task_status=task_status)
    except Exception as exc:
        errors.append(exc)
