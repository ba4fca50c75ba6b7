"""Builds: the job worker and the workspace backends. Runs inside the server
or as ``stockade provisionerd`` on another host; never imports the server."""
