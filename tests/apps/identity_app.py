"""App for tests/test_identity.py: jobs that report who they run as, and owner-scoped notes."""

from forge_kernel import job, mutation, query
from forge_kernel.app import RateLimit
from forge_kernel.errors import ForgeError
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("identity_app", 1, "probes", """
CREATE TABLE identity_probes (tag text PRIMARY KEY, kind text, user_id text, roles text[], outcome text NOT NULL);
CREATE TABLE identity_notes (id bigserial PRIMARY KEY, owner text NOT NULL, body text NOT NULL);
""")]


@query(roles=["admin"])
async def admin_secret(ctx) -> str:
    return "admin data"


@job(max_attempts=1)
async def probe(ctx, tag: str, elevate: bool = False) -> None:
    """Records the job's identity and whether it may call an admin-only query (elevated or not)."""
    caller = ctx.as_system() if elevate else ctx
    try:
        outcome = await caller.query(admin_secret)
    except ForgeError as exc:
        outcome = exc.code
    await ctx.db.execute("INSERT INTO identity_probes VALUES ($1, $2, $3, $4, $5)", tag, ctx.auth.kind,
                         ctx.auth.user_id, sorted(ctx.auth.roles), outcome)


@mutation(public=True)
async def dispatch_probe(ctx, tag: str, elevate: bool = False) -> int:
    return await ctx.dispatch(probe, tag=tag, elevate=elevate)


@mutation
async def add_note(ctx, body: str) -> int:
    return await ctx.db.fetchval("INSERT INTO identity_notes (owner, body) VALUES ($1, $2) RETURNING id",
                                 ctx.auth.user_id, body)


@query
async def my_notes(ctx) -> list[str]:
    rows = await ctx.db.fetch("SELECT body FROM identity_notes WHERE owner = $1 ORDER BY id", ctx.auth.user_id)
    return [r["body"] for r in rows]


@query(rate_limit=RateLimit(1, 3600.0))
async def once(ctx) -> str:
    return ctx.auth.scope_key()
