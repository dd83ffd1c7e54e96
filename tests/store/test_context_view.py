"""The compacted view of a conversation and the usage of a session's tasks, on SQLite and PostgreSQL."""

from __future__ import annotations

from crogia.agent.stream import sum_usage
from crogia.store import Database, repo
from crogia.store.tables import TaskRow
from tests.store.test_store import add_session


async def test_the_view_is_stored_replaced_and_deleted_with_its_session(db: Database) -> None:
    await add_session(db)
    async with db.session() as s:
        assert await repo.context_view(s, session_id="s1") == ([], 0)
    summary = [{"role": "user", "content": "[summary] ü ✓"}]
    async with db.transaction() as s:
        await repo.set_context_view(s, session_id="s1", head=summary, covers=7)
    async with db.transaction() as s:
        await repo.set_context_view(
            s, session_id="s1", head=[*summary, {"role": "assistant", "content": "x"}], covers=9
        )
    async with db.session() as s:
        head, covers = await repo.context_view(s, session_id="s1")
    assert (len(head), covers, head[0]["content"]) == (2, 9, "[summary] ü ✓")
    async with db.transaction() as s:
        await repo.delete_session(s, session_id="s1")
    async with db.session() as s:
        assert await repo.context_view(s, session_id="s1") == ([], 0)


async def test_a_session_usage_sums_its_tasks(db: Database) -> None:
    await add_session(db)
    async with db.transaction() as s:
        s.add(TaskRow(id="t1", session_id="s1", task="a", usage={"prompt_tokens": 10, "cached_tokens": 4}))
        s.add(TaskRow(id="t2", session_id="s1", task="b", usage={"prompt_tokens": 5, "reasoning_tokens": 2}))
        s.add(TaskRow(id="t3", session_id="s1", task="c", usage={}))
    async with db.session() as s:
        total = sum_usage(await repo.task_usages(s, session_id="s1"))
    assert (total["prompt_tokens"], total["cached_tokens"], total["reasoning_tokens"]) == (15, 4, 2)
