"""The workspace agent: runs inside every workspace, connects out to the
control plane, runs the template's startup script and reports. It imports
nothing from the server and runs on Python 3.9+ with only the standard
library and ``websockets`` (delivered by the control plane in its bundle)."""
