"""The kubernetes backend's pieces that need no cluster: the objects a
workspace is made of (``manifests``)."""
