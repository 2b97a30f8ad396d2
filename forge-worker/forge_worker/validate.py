"""Start-up checks of the worker-specific ``@job`` settings, naming the function at fault."""

from __future__ import annotations

from typing import Any

from forge_kernel.errors import StartupError


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def job_option_problems(options: dict[str, Any]) -> list[str]:
    problems = []
    concurrency = options.get("concurrency")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1):
        problems.append(f"concurrency must be an integer >= 1, got {concurrency!r}")
    backoff = options.get("backoff")
    if backoff is not None:
        if isinstance(backoff, dict):
            unknown = sorted(set(backoff) - {"base", "max"})
            if unknown:
                problems.append(f"backoff accepts the keys base and max, got {', '.join(map(str, unknown))}")
            for key in ("base", "max"):
                if key in backoff and not (_number(backoff[key]) and backoff[key] >= 0):
                    problems.append(f"backoff {key} must be a number of seconds >= 0, got {backoff[key]!r}")
        elif not (_number(backoff) and backoff >= 0):
            problems.append(f"backoff must be seconds >= 0 or {{'base': s, 'max': s}}, got {backoff!r}")
    max_attempts = options.get("max_attempts", 5)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= 2**31 - 1:
        problems.append(f"max_attempts must be a whole number from 1 to 2147483647, got {max_attempts!r}")
    queue = options.get("queue", "default")
    if not isinstance(queue, str) or not queue:
        problems.append(f"queue must be a non-empty string, got {queue!r}")
    priority = options.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        problems.append(f"priority must be an integer, got {priority!r}")
    capability = options.get("capability")
    if capability is not None and (not isinstance(capability, str) or not capability):
        problems.append(f"capability must be a non-empty string, got {capability!r}")
    return problems


def check_registry(registry: Any) -> None:
    """Raise ``StartupError`` listing every job whose worker settings are invalid."""
    errors = []
    for defn in registry.of_kind("job", "cron"):
        for problem in job_option_problems(dict(defn.options)):
            errors.append(f"@{defn.kind} {defn.name} ({defn.module}): {problem}")
    if errors:
        raise StartupError("invalid job settings:\n  - " + "\n  - ".join(errors))
