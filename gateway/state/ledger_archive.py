"""The ledger with its history in ClickHouse: what :func:`gateway.state.open_state` builds when
``GATEWAY_CLICKHOUSE_URL`` is set.

:class:`ArchivedLedger` is a :class:`~gateway.state.ledger.BufferedLedger` over the usual ledger
(Redis, or memory when embedded) that also hands every batch to a second buffered ledger over
:class:`~gateway.state.ledger_clickhouse.ClickHouseLedger`, with its own spool
(``<GATEWAY_SPOOL_DIR>/clickhouse``), so batches wait on disk while ClickHouse is unreachable and
are written later, once each. Reports (``totals``, ``read``) come from ClickHouse. The Redis stream
then is a bounded buffer (:func:`stream_maxlen`): the per-day rollups stay in Redis, and budgets
and rate limits never query ClickHouse.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.settings import Settings
from gateway.state.ledger import BufferedLedger, Ledger, LedgerRecord
from gateway.state.spool import Spool


def stream_maxlen(settings: Settings) -> int | None:
    """The Redis stream's cap: ``GATEWAY_LEDGER_MAX_RECORDS``, else with ClickHouse
    ``GATEWAY_LEDGER_BUFFER_RECORDS``, else none."""
    if settings.ledger_max_records:
        return settings.ledger_max_records
    return (settings.ledger_buffer_records or None) if settings.clickhouse_url else None


def clickhouse_ledger(settings: Settings) -> Any:
    from gateway.state.ledger_clickhouse import ClickHouseLedger

    assert settings.clickhouse_url is not None
    return ClickHouseLedger(settings.clickhouse_url, retention_days=settings.clickhouse_retention_days)


class ArchivedLedger(BufferedLedger):
    def __init__(self, inner: Ledger, archive: BufferedLedger, max_buffer: int = 100_000,
                 spool: Spool | None = None) -> None:
        super().__init__(inner, max_buffer, spool)
        self.archive = archive

    @property
    def pending(self) -> int:
        return super().pending + self.archive.pending

    async def append(self, records: Sequence[LedgerRecord]) -> None:
        await super().append(records)
        await self.archive.append(records)

    async def flush(self, wait: bool = False) -> int:
        return await super().flush(wait) + await self.archive.flush(wait)

    async def read(self, since: float, until: float | None = None, team: str | None = None) -> list[LedgerRecord]:
        return await self.archive.read(since, until, team)

    async def totals(self, since: float, until: float | None = None, team: str | None = None,
                     by: str = "team") -> list[dict[str, Any]]:
        return await self.archive.totals(since, until, team, by)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.archive.aclose()


def buffered(settings: Settings, inner: Ledger, spool: Spool | None = None) -> BufferedLedger:
    """``inner`` buffered (with ``spool``), and with ClickHouse configured, archived there too."""
    if not settings.clickhouse_url:
        return BufferedLedger(inner, spool=spool)
    archive_spool = None
    if settings.spool_dir:
        archive_spool = Spool(Path(settings.spool_dir) / "clickhouse")
        archive_spool.adopt()
    return ArchivedLedger(inner, BufferedLedger(clickhouse_ledger(settings), spool=archive_spool), spool=spool)
