"""A small real MCP server (the mcp SDK over streamable HTTP) in a subprocess, for tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from voicestack.launcher import free_port, wait_for_port

MCP_SERVER = textwrap.dedent('''
    import asyncio, sys
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    app = MCPServer("orders")

    @app.tool()
    def get_order_status(order_id: str) -> str:
        """Where an order is: shipped, packed or unknown."""
        if order_id == "missing":
            raise ToolError(f"no order {order_id}")
        return f"order {order_id} shipped"

    @app.tool()
    async def wait(seconds: float) -> str:
        """Waits, then answers."""
        await asyncio.sleep(seconds)
        return "done"

    @app.tool()
    def whoami(ctx: Context) -> str:
        """The caller's credential, as the server saw it."""
        return (ctx.headers or {}).get("x-api-key", "none")

    @app.tool(name="bad.name")
    def bad_name() -> str:
        return ""

    app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
''')


class McpServerProcess:
    def __init__(self, tmp_path, port: int | None = None):
        self.script = tmp_path / "mcp_server.py"
        self.script.write_text(MCP_SERVER)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen | None = None

    def start(self) -> McpServerProcess:
        self.proc = subprocess.Popen([sys.executable, str(self.script), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 30, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
