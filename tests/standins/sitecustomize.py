"""Put on PYTHONPATH by the paper-profile tests only: serve the stand-in hub (see standin_hub)."""

import os

if os.environ.get("KDLIB_STANDINS"):
    import standin_hub

    standin_hub.install()
