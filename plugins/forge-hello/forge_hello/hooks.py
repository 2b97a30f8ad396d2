"""Hook implementations: wiring only; the work is in greeter.py and app.py."""

from forge_kernel import Service, hookimpl
from forge_kernel.migrations import from_package

from .greeter import HelloConfig, greeter


@hookimpl
def forge_config_sections():
    return {"hello": HelloConfig}


@hookimpl
def forge_migrations():
    return from_package("forge_hello.sql", namespace="hello")


@hookimpl
def forge_services(node):
    return [Service("hello", greeter)]


@hookimpl
def forge_app_modules():
    return ["forge_hello.app"]


@hookimpl
def forge_cli_commands(subparsers):
    p = subparsers.add_parser("hello", help="how many greetings the hello plugin stored")
    p.set_defaults(func=_count)


async def _count(cli):
    async with cli.connection() as conn:
        print(f"{await conn.fetchval('SELECT count(*) FROM hello_greetings')} greetings")
    return 0
