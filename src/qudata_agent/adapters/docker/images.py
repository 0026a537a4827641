"""Images: what Docker has, removal, a registry's digest, an image's config, an import.

What stays true: a registry password is never part of a message (`redact`);
a registry check never sends the host's own `docker login` on a renter's
behalf, and gives up after `check_timeout_s`; removal never forces.
"""

from __future__ import annotations

from typing import Any

import docker.errors

from qudata_agent.adapters.docker import answers
from qudata_agent.adapters.docker.client import Connection, DockerError, explain, timed_out
from qudata_agent.adapters.docker.progress import auth_config, redact
from qudata_agent.domain.image_access import LocalImage, RegistryRefused, RegistryUnreachable
from qudata_agent.domain.image_ref import parse_reference
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.errors import NotFound, Unavailable


class Images(Connection):
    def image_present(self, ref: str) -> bool:
        try:
            with self._translated(f"image {ref}"):
                self._api().images.get(ref)
        except NotFound:
            return False
        return True

    def local_image(self, ref: str) -> LocalImage | None:
        """What Docker has under `ref` (a tag or a digest reference), or None."""
        try:
            with self._translated(f"image {ref}"):
                attrs: dict[str, Any] = self._api().api.inspect_image(ref)  # type: ignore[no-untyped-call]
        except NotFound:
            return None
        return answers.local_image(attrs)

    def local_images(self) -> list[LocalImage]:
        """Every image Docker has (tagged or not)."""
        with self._translated("image list"):
            found = self._api().api.images(all=False)
        return [answers.local_image(summary) for summary in found]

    def container_image_ids(self) -> frozenset[str]:
        """The image ids of every container, running or not, the agent's or not."""
        with self._translated("container list"):
            found = self._api().api.containers(all=True)
        return frozenset(str(c.get("ImageID") or "") for c in found) - {""}

    def remove_image(self, ref: str) -> bool:
        """Untags `ref` (or removes the image by id) without force; False if not there.

        Docker deletes the layers once the last reference is gone, and refuses
        (Conflict) while any container, even a stopped one, uses the image.
        """
        try:
            with self._translated(f"removal of image {ref}"):
                self._api().api.remove_image(ref, force=False, noprune=False)
        except NotFound:
            return False
        return True

    def registry_digest(self, ref: str, auth: RegistryCredentials | None) -> str:
        """The manifest digest the registry gives for `ref` now, asked through the daemon.

        The daemon makes the request as it would for a pull (its TLS, proxy and
        insecure-registry settings, the registry's token flow), with `auth`
        sent for this request only; no layer is downloaded. A registry that
        answers no (401, 403, 404): `RegistryRefused`; one that cannot be asked
        (the daemon reports that as a 500, also when credentials are missing):
        `RegistryUnreachable`. Messages never hold the password.
        """
        # An empty config, never None: with None the SDK would send the host's own
        # docker login (~/.docker/config.json) on a renter's behalf.
        config = auth_config(auth, parse_reference(ref)) if auth is not None else {}
        api = self._own_client(self._check_timeout_s)
        try:
            with self._translated(f"registry check of {ref}"):
                answer = api.inspect_distribution(ref, auth_config=config)  # type: ignore[no-untyped-call]
        except Unavailable as e:
            if not timed_out(e):
                raise  # Docker itself is down
            raise RegistryUnreachable(
                f"the registry did not answer about {ref} within {self._check_timeout_s:g} s"
            ) from e
        except NotFound as e:
            raise RegistryRefused(f"the registry has no {ref}") from e
        except DockerError as e:
            cause = e.__cause__
            api_error = cause if isinstance(cause, docker.errors.APIError) else None
            text = "" if api_error is None else redact(explain(api_error), auth)
            if api_error is not None and api_error.status_code in (401, 403):
                raise RegistryRefused(f"the registry refused access to {ref}: {text}") from e
            raise RegistryUnreachable(f"the registry could not be asked about {ref}: {text}") from e
        finally:
            api.close()
        digest = str((answer.get("Descriptor") or {}).get("digest") or "")
        if not digest:
            raise RegistryUnreachable(f"the registry gave no digest for {ref}")
        return digest

    def image_config(self, ref: str) -> ImageConfig:
        """What the (local) image runs and for which platform: its Config and Architecture."""
        with self._translated(f"image {ref}"):
            attrs: dict[str, Any] = self._api().images.get(ref).attrs
        return answers.image_config(attrs)

    def import_image(self, tar: bytes, ref: str) -> None:
        """Makes `ref` from a root filesystem tarball (`docker import`), unless it exists."""
        parsed = parse_reference(ref)
        with self._translated(f"import of {ref}"):
            if not self._api().api.images(name=ref):
                self._api().api.import_image_from_data(
                    tar, repository=parsed.repository, tag=parsed.pin
                )
