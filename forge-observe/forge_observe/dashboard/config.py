"""The ``[dashboard]`` config section."""

from __future__ import annotations

import attrs

from forge_kernel.config import in_range


@attrs.frozen
class DashboardConfig:
    #: serve the dashboard at /_forge/ (every gateway node)
    enabled: bool = True
    #: callers whose roles (JWT roles claim, API key roles) include one of these are admins;
    #: with neither list set, the dashboard answers loopback clients only, without a credential
    admin_roles: list[str] = attrs.field(factory=list)
    #: callers with one of these roles see everything and change nothing (403 on every POST)
    read_roles: list[str] = attrs.field(factory=list)
    #: hours a browser sign-in lasts (never past the token's own expiry)
    session_hours: float = attrs.field(default=8.0, validator=in_range(0.05, 24 * 30))
    #: least seconds between two live snapshots of a node (one statement for all its open pages);
    #: a change announced by a hint (NOTIFY) shows at once when the last snapshot is this old
    live_interval: float = attrs.field(default=1.0, validator=in_range(0.1, 60))
    #: seconds between live snapshots when no hint arrives (changes no one announces: rows edited by hand)
    live_poll: float = attrs.field(default=3.0, validator=in_range(0.1, 600))
    #: most rows one action on a whole filter may change
    bulk_limit: int = attrs.field(default=10_000, validator=in_range(1, 1_000_000))
    #: every dashboard query is cancelled after this many seconds
    statement_timeout: float = attrs.field(default=2.0, validator=in_range(0.1, 60))
    #: ids a jobs search walks per page (newest first); a search that finds fewer rows offers the next stretch
    #: seconds a log search (text, level or node over a long window) may take, a stretch of time per
    #: statement; the page then offers to continue from where it stopped
    search_budget: float = attrs.field(default=1.0, validator=in_range(0.1, 30))
    search_window: int = attrs.field(default=100_000, validator=in_range(1000, 100_000_000))

    @property
    def open_on_loopback(self) -> bool:
        return not self.admin_roles and not self.read_roles
