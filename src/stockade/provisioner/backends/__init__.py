"""Workspace backends behind one contract (``base.Backend``)."""

from __future__ import annotations

from stockade.provisioner.backends.base import Backend, BackendError, BackendOptions

NAMES = ("local", "docker", "terraform", "kubernetes")


class BackendSet:
    """The backends of one provisioner host, each made on first use (a host
    without Docker serves local builds and fails docker builds with a reason)."""

    def __init__(self, options: BackendOptions, deployment_id: str) -> None:
        self.options = options
        self.deployment_id = deployment_id
        self._made: dict[str, Backend] = {}

    def get(self, name: str) -> Backend:
        backend = self._made.get(name)
        if backend is None:
            backend = self._make(name)
            self._made[name] = backend
        return backend

    def _make(self, name: str) -> Backend:
        if name == "local":
            from stockade.provisioner.backends.local import LocalBackend

            return LocalBackend(self.options)
        if name == "docker":
            from stockade.provisioner.backends.docker import DockerBackend

            return DockerBackend(self.options, deployment_id=self.deployment_id)
        if name == "terraform":
            from stockade.provisioner.backends.terraform import TerraformBackend

            return TerraformBackend(self.options)
        if name == "kubernetes":
            from stockade.provisioner.backends.kubernetes import KubernetesBackend

            return KubernetesBackend(self.options, deployment_id=self.deployment_id)
        raise BackendError(
            f"this provisioner has no {name!r} backend (it has: {', '.join(NAMES)})",
            reason="unknown_backend",
        )

    def started(self) -> list[str]:
        return list(self._made)

    async def close(self) -> None:
        for backend in self._made.values():
            await backend.close()
