"""The daemon's web server: /healthz, /metrics, the console, and routes other parts add.

``app.build_app`` builds the ASGI application; ``server.WebServer`` serves it with uvicorn on a
thread of the daemon's process.
"""
