"""`edgesync up` runs the operator API too, and `edgesync cmd` finds it (and its token)
through runtime.json with no other settings."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.integration.control_harness import run_cli
from tests.support import edgesync_up, until


async def test_up_serves_the_api_and_the_cli_uses_runtime_json(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """runtime.json carries api_url and a generated operator_token (mode 0600);
    `edgesync cmd --state-dir` configures the simulated edge and waits for `applied`."""
    async with edgesync_up(tmp_path, "--bridge-port", "0", "--api-port", "0",
                           state=reachable_dir / "state") as up:
        state, runtime = up.state, up.runtime
        assert runtime["api_url"].startswith("http://127.0.0.1:")
        assert len(runtime["operator_token"]) >= 24
        assert stat.S_IMODE(up.runtime_file.stat().st_mode) == 0o600

        async def edge_known() -> bool:
            listed = await run_cli("cmd", "--state-dir", str(state), "edges", "--json")
            return listed.exit_code == 0 and "edge-1" in listed.output

        await until(edge_known, timeout=15, interval=0.2, message="edge-1 never reported")
        sent = await run_cli("cmd", "--state-dir", str(state), "configure", "edge-1",
                             "--batch-max-records", "100", "--wait", "--timeout", "20")
        assert sent.exit_code == 0, sent.output + sent.stderr
        assert "applied" in sent.output
        # Kubernetes commands are refused by default: no namespace is allowed.
        refused = await run_cli("cmd", "--state-dir", str(state), "restart", "edge-1",
                                "prod/web", "--wait", "--timeout", "20")
        assert refused.exit_code == 1 and "not allowed" in refused.output
        assert up.interrupt() == 0, up.log_tail()
    assert (state / "keys" / "edgesync.key").exists()
