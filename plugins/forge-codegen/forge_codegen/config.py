"""``[codegen]``: where the TypeScript client goes and how ``forge-node dev`` watches."""

from __future__ import annotations

import attrs

from forge_kernel.config import in_range


@attrs.frozen
class CodegenConfig:
    #: folder of the generated TypeScript client (api.ts, runtime.ts); empty: `generate ts` needs --out
    #: and `dev` does not write one
    ts_out: str = ""
    #: also write the Svelte 5 bindings (svelte.svelte.ts)
    svelte: bool = False
    #: seconds between scans of the app's source folders in `forge-node dev`
    poll_interval: float = attrs.field(default=0.1, validator=in_range(0.01, 10))
